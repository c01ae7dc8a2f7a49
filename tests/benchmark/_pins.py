"""Digests of the benchmark settings and loaders, pinned before the issue-15 refactor.

``digests(tmp)`` recomputes them; ``test_refactor_pins.py`` compares with the recorded values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mido
import numpy as np
import torch
from _benchmark_files import write_cifar, write_maestro, write_mnist_idx

from tdabench.benchmark import get_setting, list_settings
from tdabench.benchmark.data import read_midi_notes


def _sha(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_sha(t: torch.Tensor) -> str:
    a = t.detach().cpu().contiguous().numpy()
    return hashlib.sha256(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()


def _data_sha(data, tmp: Path) -> str:
    parts = [_tensor_sha(t) for t in (*data.train, *data.test)]
    meta = json.dumps(data.meta, sort_keys=True, default=str).replace(str(tmp), "<tmp>")
    return _sha([parts, meta])


def pedal_midi(path: Path, seed: int = 0) -> Path:
    """A two-track MIDI file with overlapping notes, pedal, drums, tempo changes and vel-0 offs."""
    rng = np.random.default_rng(seed)
    mid = mido.MidiFile(type=1, ticks_per_beat=96)
    for track_no in range(2):
        tr = mido.MidiTrack()
        tr.append(mido.MetaMessage("set_tempo", tempo=int(rng.integers(300_000, 900_000)), time=0))
        for _ in range(150):
            t = int(rng.integers(0, 40))
            ch = int(rng.choice([0, 1, 9])) if track_no else 0
            r = rng.random()
            if r < 0.4:
                msg = mido.Message(
                    "note_on",
                    channel=ch,
                    note=int(rng.integers(55, 62)),
                    velocity=int(rng.integers(1, 128)),
                    time=t,
                )
            elif r < 0.6:
                msg = mido.Message("note_off", channel=ch, note=int(rng.integers(55, 62)), time=t)
            elif r < 0.75:
                msg = mido.Message(
                    "note_on", channel=ch, note=int(rng.integers(55, 62)), velocity=0, time=t
                )
            elif r < 0.95:
                msg = mido.Message(
                    "control_change",
                    channel=ch,
                    control=64,
                    value=int(rng.choice([0, 30, 64, 127])),
                    time=t,
                )
            else:
                msg = mido.MetaMessage(
                    "set_tempo", tempo=int(rng.integers(300_000, 900_000)), time=t
                )
            tr.append(msg)
        mid.tracks.append(tr)
    mid.save(str(path))
    return path


def digests(tmp: Path) -> dict[str, str]:
    out = {f"setting:{n}": _sha(get_setting(n).to_dict()) for n in list_settings()}
    out["override"] = _sha(
        get_setting("mnist_mlp", epochs=2, hidden=(8,), recipe={"lr": 0.5}).to_dict()
    )
    write_cifar(tmp / "cifar" / "cifar-10-batches-py")
    write_maestro(tmp / "maestro")
    write_mnist_idx(tmp / "idx")
    loads = {
        "mnist_lr": ({}, None),
        "mnist_lr_idx_random": (
            {"n_train": 30, "n_test": 10, "data_config": {"subset": "random"}},
            tmp / "idx",
        ),
        "cifar2_resnet9_tiny": ({"n_train": 20, "n_test": 4}, tmp / "cifar"),
        "cifar10_resnet9_tiny": (
            {"n_train": 50, "n_test": 15, "data_config": {"subset": "random"}},
            tmp / "cifar",
        ),
        "maestro_musictransformer_tiny": ({}, None),
        "maestro_musictransformer": ({"n_train": 20, "n_test": 1, "seq_len": 16}, tmp / "maestro"),
        "shakespeare_nanogpt_tiny": ({}, None),
    }
    for key, (over, root) in loads.items():
        name = key.removesuffix("_idx_random")
        out[f"load:{key}"] = _data_sha(get_setting(name, **over).load(data_root=root, seed=3), tmp)
    path = pedal_midi(tmp / "pedal.mid")
    for sustain in (True, False):
        notes = read_midi_notes(path, sustain=sustain)
        out[f"midi:sustain={sustain}"] = _sha(
            [[n.pitch, n.velocity, repr(n.start), repr(n.end)] for n in notes]
        )
    out["midi:bytes"] = _sha([repr(n) for n in read_midi_notes(path.read_bytes())])
    return out
