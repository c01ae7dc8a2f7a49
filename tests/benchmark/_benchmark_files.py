"""Writers of small data files in the official formats, for the benchmark tests."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np

from tdabench.benchmark.data import Note, write_idx, write_midi


def write_mnist_idx(
    root: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0
):
    """Four MNIST-layout IDX files with random images and labels; returns the arrays."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for name, a in arrays.items():
        write_idx(root / (name + (".gz" if gz else "")), a)
    return arrays


def cifar_batch_dict(rng: np.random.Generator, n: int, py2_keys: bool = True) -> dict:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    if py2_keys:
        return {
            b"batch_label": b"fixture",
            b"labels": labels,
            b"data": data,
            b"filenames": [b"x.png"] * n,
        }
    return {"batch_label": "fixture", "labels": labels, "data": data}


def write_cifar(
    root: Path, n_per_batch: int = 30, n_test: int = 40, seed: int = 0
) -> dict[str, dict]:
    """Six CIFAR python batches. data_batch_1 is written like the real (Python 2) files: pickle
    protocol 2 with the global ``numpy.core.multiarray._reconstruct``; the others with protocol 4."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = cifar_batch_dict(
            rng, n_test if name == "test_batch" else n_per_batch, py2_keys=name != "data_batch_3"
        )
        if name == "data_batch_1":
            raw = pickle.dumps(d, protocol=2).replace(
                b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"
            )
        else:
            raw = pickle.dumps(d, protocol=4)
        (root / name).write_bytes(raw)
        out[name] = d
    return out


def write_maestro(root: Path) -> dict[str, list[Note]]:
    """A MAESTRO-layout folder: maestro-v3.0.0.csv and three MIDI files (2 train, 1 test)."""
    pieces: dict[str, list[Note]] = {}
    rng = np.random.default_rng(0)
    rows = []
    for i, split in enumerate(["train", "train", "validation", "test"]):
        notes = []
        t = 0.0
        for _ in range(60):
            dur = float(rng.choice([0.1, 0.25, 0.5]))
            notes.append(Note(int(rng.integers(40, 90)), int(rng.integers(30, 120)), t, t + dur))
            t += float(rng.choice([0.05, 0.1, 0.3]))
        rel = f"2018/piece_{i}.midi"
        (root / "2018").mkdir(parents=True, exist_ok=True)
        write_midi(root / rel, notes)
        pieces[rel] = notes
        rows.append(
            {
                "canonical_composer": "Fixture",
                "canonical_title": f"Piece {i}",
                "split": split,
                "year": "2018",
                "midi_filename": rel,
                "audio_filename": rel.replace(".midi", ".wav"),
                "duration": f"{t:.3f}",
            }
        )
    with open(root / "maestro-v3.0.0.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return pieces
