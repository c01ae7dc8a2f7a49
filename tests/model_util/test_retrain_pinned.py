"""``retrain_loo`` / ``retrain_lds`` pinned: every file they write, to the byte.

The oracle is the code before issue 15's split of both functions (commit c14ab0f). The
``train_func`` saves what the retrainer decides (the subset in the order its loader yields it,
draws of the global RNG it seeds, the model seed, the keyword arguments) without arithmetic, so
the digest of the directory (safetensors files with their metadata, ``manifest.json``, dattri's
``metadata.yml``, ``indices.txt`` and the tensors of the ``.pt`` copies) changes if any of them
does, and does not depend on the CPU's kernels (torch's CPU generator is the same everywhere).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from tdabench.model_util.retrain import list_retrained, retrain_lds, retrain_loo

N = 20


def _loader() -> DataLoader:
    ids = torch.arange(N, dtype=torch.float64)
    return DataLoader(TensorDataset(ids, -ids), batch_size=6, shuffle=True)


def train_func(loader: DataLoader, seed: int, scale: float = 1.0) -> dict[str, Tensor]:
    """A "model" recording what the retrainer controls: the samples in the loader's order,
    two draws of the global RNG it seeded, the seed and the keyword argument."""
    seen = torch.cat([ids for ids, _ in loader])
    return {
        "seen": seen * scale,
        "init": torch.rand(2, dtype=torch.float64),
        "seed": torch.tensor([seed], dtype=torch.int64),
    }


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            continue
        h.update(str(p.relative_to(root)).encode())
        if p.suffix == ".pt":  # torch's zip container is not byte-stable; its tensors are
            for k, v in sorted(torch.load(p, weights_only=True).items()):
                h.update(k.encode() + v.numpy().tobytes())
        else:
            text = p.read_bytes().replace(str(root).encode(), b"<root>")
            h.update(text.replace(train_func.__module__.encode(), b"<module>"))
    return h.hexdigest()


def test_retrain_lds_files_are_pinned(tmp_path):
    retrain_lds(train_func, _loader(), tmp_path, num_subsets=2, num_runs_per_subset=2, seed=3)
    retrain_lds(train_func, _loader(), tmp_path, num_subsets=1, num_runs_per_subset=2, start_id=2, seed=3)  # fmt: skip
    assert len(list_retrained(tmp_path)[1]) == 6
    assert _digest(tmp_path) == "66415490d474f96ecd5428500ceb9744be46a2e7dda7349db5e945509ee15ff8"


def test_retrain_loo_files_are_pinned(tmp_path):
    retrain_loo(train_func, _loader(), tmp_path, indices=[4, 0, 13], seed=2, scale=0.5)
    assert len(list_retrained(tmp_path)[1]) == 3
    assert _digest(tmp_path) == "a6d111f30f778ce9289c761b8bc029e5c929ef587a60867199d137455119396d"
