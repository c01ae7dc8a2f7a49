"""Bit-exact pins of the trainers' numbers (issue 15's refactor must not change one bit).

Each case trains a few small models through one code path of the trainers (the hand-written
fast path of :mod:`tdabench.groundtruth._fast_mlp` in every first-layer mode, the generic
``vmap(grad(...))`` path with every optimiser, the compact per-model batches, batch norm, the
sequential ``torch.optim`` reference) and compares a sha256 of the exact bytes of every trained
tensor, every per-epoch snapshot and the evaluated targets with the digest the code produced
before the refactor. The oracle is the earlier code itself: the digests below were computed on
commit c14ab0f (before any of issue 15's trainer refactor) and the refactor keeps the same
floating-point operations in the same order and the same RNG draws.

Floating-point results depend on the CPU kernels torch picks, so the pins hold for the platform
they were recorded on (:data:`PLATFORM`: torch version and CPU capability); elsewhere the test
says so and skips. To re-record after a deliberate change of the numbers (which must also bump
``TRAINER_VERSION``): ``PYTHONPATH=src python tests/groundtruth/test_trainer_pinned.py``.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import Tensor, nn

from tdabench.groundtruth.trainer import BatchedTrainer, SequentialTrainer

N, D, C, NT = 48, 10, 3, 12


def platform() -> str:
    """The torch version and CPU kernel family the digests depend on."""
    return f"{torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def _data(kind: str, dtype: torch.dtype) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    if kind == "sparse":  # like MNIST pixels: columns 2.. rarely non-zero (embedding_bag inputs)
        x[:, 2:] = torch.relu(x[:, 2:] - 1.2)
    elif kind == "rare":  # every column rarely non-zero: no dense GEMM columns at all
        x = torch.relu(x - 1.2)
    x[:, 1] = 0.0  # zero for every training sample: dropped from the GEMMs without decay
    y = torch.randint(0, C, (N,), generator=g)
    xt = torch.randn(NT, D, generator=g, dtype=torch.float64)
    yt = torch.randint(0, C, (NT,), generator=g)
    return (x.to(dtype), y), (xt.to(dtype), yt)


def _masks(m: int, k: int, seed: int = 3) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g) < k for _ in range(m)])


def lr_model() -> nn.Module:
    return nn.Linear(D, C)


def lr_nobias() -> nn.Module:
    return nn.Linear(D, C, bias=False)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 6), nn.ReLU(), nn.Linear(6, C))


def deep_mixed() -> nn.Module:
    """Three layers: a ReLU, a Linear straight into a Linear, a bias-free last layer."""
    return nn.Sequential(
        nn.Linear(D, 7, bias=False),
        nn.ReLU(),
        nn.Linear(7, 5),
        nn.Linear(5, C, bias=False),
    )


def bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, C))


SGD = dict(optimizer="sgd", lr=0.3, epochs=3, batch_size=8)
MOMENTUM_WD = dict(
    optimizer="sgd",
    lr=0.2,
    momentum=0.9,
    weight_decay=1e-2,
    warmup_iters=2,
    lr_min=1e-3,
    epochs=3,
    batch_size=8,
)
MOMENTUM = dict(optimizer="sgd", lr=0.2, momentum=0.5, epochs=2, batch_size=6)
WD = dict(optimizer="sgd", lr=0.2, weight_decay=5e-2, epochs=2, batch_size=6)
ADAM_CLIP = dict(
    optimizer="adam", lr=0.05, weight_decay=1e-2, grad_clip=0.5, epochs=2, batch_size=8
)
ADAMW_SCHED = dict(
    optimizer="adamw", lr=0.05, weight_decay=0.1, warmup_iters=3, lr_min=0.0, max_iters=11,
    batch_size=8,
)  # fmt: skip

#: name -> (trainer class, build_model, data kind, dtype, recipe, trainer options, k per mask,
#: expect the fast path). Small ``k`` with ``stream_batch="fixed"`` leaves models without
#: members on some steps (the skipped-step paths).
CASES: dict[str, tuple] = {
    "fast_lr_sparse_shared": (BatchedTrainer, lr_model, "sparse", torch.float64, SGD, {}, 24, 1),
    "fast_lr_sparse_compact": (
        BatchedTrainer, lr_model, "sparse", torch.float64, SGD, {"compact": True}, 24, 1,
    ),
    "fast_mlp_dense_shared_skips": (
        BatchedTrainer, mlp, "dense", torch.float64, MOMENTUM_WD, {"stream_batch": "fixed"}, 5, 1,
    ),
    "fast_mlp_sparse_compact_skips": (
        BatchedTrainer, mlp, "sparse", torch.float64, MOMENTUM_WD,
        {"stream_batch": "fixed", "compact": True}, 5, 1,
    ),
    "fast_nobias_rare_shared": (
        BatchedTrainer, lr_nobias, "rare", torch.float64, MOMENTUM, {"stream_batch": "fixed"}, 6, 1,
    ),
    "fast_nobias_rare_compact": (
        BatchedTrainer, lr_nobias, "rare", torch.float64, MOMENTUM,
        {"stream_batch": "fixed", "compact": True}, 6, 1,
    ),
    "fast_deep_sparse_shared": (
        BatchedTrainer, deep_mixed, "sparse", torch.float64, WD, {"stream_batch": "fixed"}, 6, 1,
    ),
    "fast_deep_sparse_compact": (
        BatchedTrainer, deep_mixed, "sparse", torch.float64, MOMENTUM, {"compact": True}, 30, 1,
    ),
    "fast_mlp_f32_shared": (BatchedTrainer, mlp, "sparse", torch.float32, MOMENTUM, {}, 30, 1),
    "fast_mlp_f32_compact": (
        BatchedTrainer, mlp, "sparse", torch.float32, WD, {"compact": True}, 30, 1,
    ),
    "vmap_mlp_momentum_wd": (
        BatchedTrainer, mlp, "dense", torch.float64, MOMENTUM_WD,
        {"fast_path": False, "compact": False, "stream_batch": "fixed"}, 6, 0,
    ),
    "vmap_mlp_adam_clip_compact": (
        BatchedTrainer, mlp, "dense", torch.float64, ADAM_CLIP,
        {"compact": True, "stream_batch": "fixed"}, 6, 0,
    ),
    "vmap_deep_adamw_plain_linear": (
        BatchedTrainer, deep_mixed, "dense", torch.float64, ADAMW_SCHED,
        {"fast_linear": False}, 24, 0,
    ),
    "vmap_batchnorm_sgd": (
        BatchedTrainer, bn_mlp, "dense", torch.float64, MOMENTUM, {"stream_batch": "fixed"}, 12, 0,
    ),
    "vmap_f32_sgd": (
        BatchedTrainer, mlp, "dense", torch.float32, SGD, {"fast_path": False}, 24, 0,
    ),
    "sequential_momentum_wd": (
        SequentialTrainer, mlp, "dense", torch.float64, MOMENTUM_WD, {"stream_batch": "fixed"}, 6, 0,
    ),
    "sequential_batchnorm_adam": (
        SequentialTrainer, bn_mlp, "dense", torch.float64, ADAM_CLIP, {}, 24, 0,
    ),
}  # fmt: skip

PLATFORM = "2.13.0+cpu AVX512"
PINNED: dict[str, str] = {
    "fast_lr_sparse_shared": "2dba658402622b2c7b04e49a3b96b1dd682a8aecfad65899c1e635f0e97d0c96",
    "fast_lr_sparse_compact": "d3a8044e7a3a42a1cdc79d27ba452a162c52128b0e0c0f56272317872432bd50",
    "fast_mlp_dense_shared_skips": "7a4a532adbae4948e3eb4c4192863c56c12b0b8bc301e7fab6da137966263bf4",
    "fast_mlp_sparse_compact_skips": "fd0db6fbb9c4524a7993deb442993ddaa28a57b50da8663db6db8d3538c5d93e",
    "fast_nobias_rare_shared": "ec445e5e298528cc93e240526bd9b16bd7454503d1ca0b7918bcfb6db22f6280",
    "fast_nobias_rare_compact": "ec445e5e298528cc93e240526bd9b16bd7454503d1ca0b7918bcfb6db22f6280",
    "fast_deep_sparse_shared": "4658990a620d588e0671599b35e3368b54a92e424a68185b612f93ad32fd4847",
    "fast_deep_sparse_compact": "8bfb1c2ec1753f7877721f57cda9b0e7cf1e2119579108a644becdcf8c770ba6",
    "fast_mlp_f32_shared": "c9abb77651a0268782a33b158c0b3d6c62ee8a6400e20047f93b4c638a565156",
    "fast_mlp_f32_compact": "1d5aafc009fa2b5175062bd42c335a0deb89ce37f78e502fc3619cd46c7c5476",
    "vmap_mlp_momentum_wd": "ecf9d8c5cafdf4be60dc8c36f0d96aea18c6ffe39a30c2fa29f5517e54b33764",
    "vmap_mlp_adam_clip_compact": "ca5c8670f730efcf6596f30a8b36a69327132e6023bb6be12d7950022b8fc9dc",
    "vmap_deep_adamw_plain_linear": "5d3b066e5cf02875ee1a61f92f2b6319ccce512eb182a3c23f0494a45e49cc97",
    "vmap_batchnorm_sgd": "414a4af2d0407f0214dd05f54f5924e1531ea32443e862d56d4fed44532fd2df",
    "vmap_f32_sgd": "056e65f87022ca19fdc7ce2be0fa8383dfae4bb6cfe0cfed900ed21a2deefc9f",
    "sequential_momentum_wd": "5ca323b524b4357b75491751a7da5abf3b6834f6ce140bb0856125c4fe19682b",
    "sequential_batchnorm_adam": "59979b62740fb9650ff300a89670c3ffc5f566f2e3fd2350fab6e015d18a9a25",
}


def _digest(parts: list[tuple[str, Tensor]]) -> str:
    """sha256 of the names, dtypes, shapes and exact bytes of ``parts`` in order."""
    h = hashlib.sha256()
    for name, t in parts:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_case(name: str) -> str:
    """Train the case's models and digest final states, snapshots and evaluated targets."""
    cls, build, kind, dtype, recipe, options, k, fast = CASES[name]
    train, test = _data(kind, dtype)
    trainer = cls(build, train, test, recipe, stream_seed=5, dtype=dtype, **options)
    if cls is BatchedTrainer:
        assert trainer.fast_path == bool(fast), trainer.fast_path_reason
    parts: list[tuple[str, Tensor]] = []

    def on_epoch(epoch: int, rows: list[int], stacked: dict[str, Tensor]) -> None:
        parts.extend((f"e{epoch}r{rows}{key}", v) for key, v in sorted(stacked.items()))

    masks = _masks(4, k)
    stacked = trainer.train(masks, [11, 12, 13, 14], on_epoch=on_epoch)
    parts.extend(sorted(stacked.items()))
    for target in ("loss", "margin"):
        parts.append((target, trainer.evaluate(stacked, target)))
    return _digest(parts)


@pytest.mark.parametrize("name", list(CASES))
def test_trained_numbers_are_pinned(name: str) -> None:
    if platform() != PLATFORM:
        pytest.skip(f"digests recorded on {PLATFORM!r}, this is {platform()!r}; re-record")
    assert run_case(name) == PINNED[name]


def _print_pins() -> None:
    print(f'PLATFORM = "{platform()}"')
    print("PINNED: dict[str, str] = {")
    for name in CASES:
        print(f'    "{name}": "{run_case(name)}",')
    print("}")


if __name__ == "__main__":
    _print_pins()
