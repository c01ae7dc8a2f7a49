"""MAESTRO (v2/v3 layout) and the offline Bach-chorale stand-in, as event-token sequences.

Both sources become lists of pieces, each tokenised with :mod:`tdabench.benchmark.data.midi`.
A piece of ``L`` tokens yields ``(L - 1) // T`` non-overlapping samples (inputs
``tok[i*T : i*T+T]``, labels shifted by one), as in the reference's sliding windows of the
full data set. Training samples are taken from the training pieces in order until ``n_train``
are collected; test samples are the first ``test_windows_per_piece`` windows (the reference:
1, from the start of each piece) of each test piece in order, up to ``n_test``. Pieces
shorter than ``T + 1`` tokens give no sample. Pieces are parsed lazily, only as many as needed.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdabench._io import safe_join
from tdabench.benchmark.data.common import (
    BenchmarkData,
    import_optional,
    require_path,
    sha256_file,
)
from tdabench.benchmark.data.midi import encode_midi
from tdabench.errors import DataError

__all__ = ["bach_chorale_paths", "load_bach_chorales", "load_maestro", "read_maestro_csv"]

logger = logging.getLogger(__name__)


def read_maestro_csv(
    root: str | os.PathLike, setting: str | None = None
) -> tuple[Path, list[dict[str, str]]]:
    """The MAESTRO metadata csv under ``root`` (``maestro-v*.csv``) and its rows.

    Rows need the columns ``split`` (train / validation / test) and ``midi_filename``
    (relative to ``root``).
    """
    base = require_path(root, "MAESTRO folder", setting)
    found = sorted(base.glob("maestro-v*.csv"))
    if not found:
        how = f"get_setting({setting!r}).load(data_root=...)" if setting else "data_root"
        raise DataError(
            f"no maestro-v*.csv under {str(base)!r}; pass the unpacked MAESTRO folder "
            f"(maestro-v3.0.0.csv and the year folders of .midi files) with {how}"
        )
    path = found[-1]
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"split", "midi_filename"} <= set(rows[0]):
        raise DataError(
            f"{str(path)!r} lacks the columns 'split' and 'midi_filename'; is it the MAESTRO csv?"
        )
    return path, rows


def _windows(tokens: np.ndarray, T: int, limit: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    n = (len(tokens) - 1) // T if len(tokens) > T else 0
    if limit is not None:
        n = min(n, limit)
    return [(tokens[i * T : i * T + T], tokens[i * T + 1 : i * T + T + 1]) for i in range(n)]


def _collect(
    pieces: Iterable[tuple[str, Callable[[], np.ndarray]]],
    T: int,
    n: int,
    per_piece: int | None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    samples: list[tuple[np.ndarray, np.ndarray]] = []
    used: list[str] = []
    for name, tokenise in pieces:
        if len(samples) >= n:
            break
        w = _windows(tokenise(), T, per_piece)
        if w:
            used.append(name)
            samples.extend(w[: n - len(samples)])
    return samples, used


def _stack(samples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack([s[0] for s in samples]).astype(np.int64))
    y = torch.from_numpy(np.stack([s[1] for s in samples]).astype(np.int64))
    return x, y


def _finish(
    train: list, test: list, n_train: int, n_test: int, what: str, meta: dict[str, Any]
) -> BenchmarkData:
    if len(train) < n_train:
        raise DataError(
            f"{what} gives only {len(train)} training sequences but {n_train} were requested; "
            "add pieces or lower n_train (get_setting(name, n_train=...))"
        )
    if not test:
        raise DataError(f"{what} gives no test sequence; add test pieces or lower seq_len")
    if len(test) < n_test:
        logger.warning(
            "%s gives %d test sequences (%d requested); using %d",
            what,
            len(test),
            n_test,
            len(test),
        )
        meta["n_test_requested"] = n_test
    x_tr, y_tr = _stack(train)
    x_te, y_te = _stack(test)
    return BenchmarkData(train=(x_tr, y_tr), test=(x_te, y_te), meta=meta)


def load_maestro(
    root: str | os.PathLike,
    n_train: int,
    n_test: int,
    seq_len: int,
    test_windows_per_piece: int | None = 1,
    sustain: bool = True,
    setting: str | None = None,
) -> BenchmarkData:
    """Event-token sequences from MAESTRO at ``root`` (csv + MIDI files).

    Args:
        root: folder holding ``maestro-v3.0.0.csv`` (or another ``maestro-v*.csv``) and the
            ``midi_filename`` paths it lists.
        n_train: training sequences (from ``split == "train"`` pieces, in csv order).
        n_test: test sequences (from ``split == "test"`` pieces, in csv order).
        seq_len: tokens per sequence ``T``.
        test_windows_per_piece: windows taken from each test piece (``None``: all).
        sustain: apply the sustain pedal when tokenising.

    Returns:
        inputs and labels int64 ``(n, T)``.
    """
    csv_path, rows = read_maestro_csv(root, setting)
    base = Path(root)
    used_files: dict[str, str] = {}

    def pieces(split: str) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
        for row in rows:
            if row["split"].strip() == split:
                rel = row["midi_filename"].strip()

                def tok(rel: str = rel) -> np.ndarray:
                    p = safe_join(base, rel, f"{csv_path.name} midi_filename")
                    used_files[rel] = sha256_file(p) if p.is_file() else "missing"
                    return encode_midi(p, sustain=sustain)

                yield rel, tok

    train, train_used = _collect(pieces("train"), seq_len, n_train, None)
    test, test_used = _collect(pieces("test"), seq_len, n_test, test_windows_per_piece)
    meta = {
        "source": "maestro-midi",
        "root": str(base),
        "files": {"csv": {"name": csv_path.name, "sha256": sha256_file(csv_path)}},
        "midi_sha256": {k: used_files[k] for k in sorted(used_files)},
        "tokenizer": "performance events 388 (note-on/off 128+128, time-shift 100x10ms, velocity 32)",
        "sustain": sustain,
        "seq_len": seq_len,
        "split": {
            "method": "csv split column; train: consecutive windows of train pieces in csv order; "
            f"test: first {test_windows_per_piece or 'all'} window(s) of each test piece",
            "train_pieces": train_used,
            "test_pieces": test_used,
        },
    }
    return _finish(train, test, n_train, n_test, f"MAESTRO at {str(base)!r}", meta)


def bach_chorale_paths() -> list[Path]:
    """The Bach chorale scores shipped in PyPI ``music21`` (``corpus/bach``), sorted by name."""
    corpus = import_optional(
        "music21.corpus",
        "the offline MAESTRO stand-in needs PyPI music21: pip install 'tdabench[data]'; "
        "or pass a MAESTRO folder with data_root",
    )
    paths = sorted((Path(p) for p in corpus.getComposer("bach")), key=lambda p: p.name)
    if not paths:
        raise DataError(
            "music21 ships no Bach corpus here; reinstall music21 or pass a MAESTRO folder with data_root"
        )
    return paths


def _chorale_midi_bytes(path: Path) -> bytes:
    from music21 import converter, midi

    score = converter.parseFile(path, forceSource=True, storePickle=False)
    return midi.translate.streamToMidiFile(score).writestr()


def load_bach_chorales(
    n_train: int,
    n_test: int,
    seq_len: int,
    test_windows_per_piece: int | None = None,
    test_every: int = 10,
) -> BenchmarkData:
    """Offline stand-in for MAESTRO: Bach chorales from music21, rendered to MIDI, tokenised.

    Each score is parsed by music21 (never from its pickle cache), written as MIDI by
    music21 and read back through the same mido-based tokeniser as MAESTRO (no pedal).
    Every ``test_every``-th chorale (index ``% test_every == test_every - 1`` in name order)
    is a test piece; the others are training pieces.
    """
    import music21

    paths = bach_chorale_paths()
    used: dict[str, str] = {}

    def pieces(test: bool) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
        for i, p in enumerate(paths):
            if (i % test_every == test_every - 1) == test:

                def tok(p: Path = p) -> np.ndarray:
                    used[p.name] = sha256_file(p)
                    return encode_midi(_chorale_midi_bytes(p), sustain=False)

                yield p.name, tok

    train, train_used = _collect(pieces(False), seq_len, n_train, None)
    test, test_used = _collect(pieces(True), seq_len, n_test, test_windows_per_piece)
    meta = {
        "source": "music21-bach-chorales",
        "music21_version": music21.__version__,
        "files": {k: {"name": k, "sha256": used[k]} for k in sorted(used)},
        "tokenizer": "performance events 388 (note-on/off 128+128, time-shift 100x10ms, velocity 32)",
        "seq_len": seq_len,
        "split": {
            "method": f"chorales in name order; every {test_every}th is a test piece; "
            f"train: consecutive windows; test: first {test_windows_per_piece or 'all'} window(s) per piece",
            "train_pieces": train_used,
            "test_pieces": test_used,
        },
    }
    return _finish(train, test, n_train, n_test, "the music21 Bach chorales", meta)
