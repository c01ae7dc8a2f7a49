"""The private torch APIs tdabench relies on for speed (tdabench._compat): each one is checked
to still behave as used (a torch upgrade that changes it fails here, loudly), and each public
fallback is run by forcing it (TDABENCH_PUBLIC_TORCH_ONLY=1) against the same oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vjp, vmap

from tdabench._compat import (
    PUBLIC_ONLY_ENV,
    batch_norm_types,
    mode_dependent_layer_types,
    running_stat_norm_types,
)
from tdabench.func import batching
from tdabench.func.curvature import hvp_matvec
from tdabench.groundtruth import _fast_mlp, _vmap_linear

DT = torch.float64


@pytest.fixture
def public(monkeypatch):
    monkeypatch.setenv(PUBLIC_ONLY_ENV, "1")


def _hvp_problem():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 6, generator=g, dtype=DT), torch.randint(0, 3, (40,), generator=g)
    theta = torch.randn(21, generator=g, dtype=DT)

    def f(t):
        return F.cross_entropy(X @ t[:18].view(3, 6).T + t[18:], y, reduction="sum")

    return f, theta, torch.func.hessian(f)(theta), torch.randn(5, 21, generator=g, dtype=DT)


# ---------------------------------------------------------------------- TorchDispatchMode on aten.bmm
def test_dispatch_mode_still_intercepts_broadcast_bmm(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode  # private: must still exist

    assert issubclass(batching._FoldBroadcastBmm, TorchDispatchMode)
    assert batching.folding_available()
    hits = []
    real = batching.folded_bmm
    monkeypatch.setattr(batching, "folded_bmm", lambda a, b: hits.append(1) or real(a, b))
    f, theta, H, V = _hvp_problem()
    out = hvp_matvec(f, theta)(V)
    assert hits, "aten.bmm no longer reaches the dispatch mode: the fold is dead code"
    torch.testing.assert_close(out, V @ H, rtol=1e-10, atol=1e-12)


def test_dispatch_mode_fallback(public, monkeypatch):
    hits = []
    monkeypatch.setattr(batching, "folded_bmm", lambda a, b: hits.append(1))
    assert not batching.folding_available()
    f, theta, H, V = _hvp_problem()
    torch.testing.assert_close(hvp_matvec(f, theta)(V), V @ H, rtol=1e-10, atol=1e-12)
    assert not hits
    _, vjp_fn = vjp(grad(f), theta)
    torch.testing.assert_close(hvp_matvec(f, theta)(V), vmap(vjp_fn)(V)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------- aten.threshold_backward
def _relu_case():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(4, 7, 9, generator=g, dtype=DT)
    pre[0, 0, :3] = 0.0
    pre[1, 2, 4] = float("nan")
    return torch.randn(4, 7, 9, generator=g, dtype=DT), pre


def _relu_oracle(grad_, pre):
    return torch.where(pre <= 0, torch.zeros_like(grad_), grad_)  # NaN <= 0 is False: grad kept


def test_threshold_backward_is_relu_backward():
    assert _fast_mlp._THRESHOLD_BACKWARD is not None, "torch.ops.aten.threshold_backward is gone"
    grad_, pre = _relu_case()
    torch.testing.assert_close(
        _fast_mlp.relu_backward(grad_, pre), _relu_oracle(grad_, pre), rtol=0, atol=0
    )
    # the same as autograd's ReLU backward where the pre-activation is finite
    p = pre.nan_to_num(-1.0).requires_grad_(True)
    (auto,) = torch.autograd.grad(torch.relu(p), p, grad_)
    torch.testing.assert_close(_fast_mlp.relu_backward(grad_, p.detach()), auto, rtol=0, atol=0)


def test_threshold_backward_fallback(public, monkeypatch):
    monkeypatch.setattr(
        _fast_mlp, "_THRESHOLD_BACKWARD", lambda *a: pytest.fail("private path used")
    )
    grad_, pre = _relu_case()
    torch.testing.assert_close(
        _fast_mlp.relu_backward(grad_, pre), _relu_oracle(grad_, pre), rtol=0, atol=0
    )


# ---------------------------------------------------------------------- _NormBase / _DropoutNd
LAYERS = [
    nn.BatchNorm1d(3),
    nn.BatchNorm2d(3),
    nn.InstanceNorm2d(3, track_running_stats=True),
    nn.Dropout(0.1),
    nn.Dropout2d(0.1),
    nn.AlphaDropout(0.1),
]


def test_private_norm_and_dropout_bases():
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.dropout import _DropoutNd

    assert mode_dependent_layer_types() == (_DropoutNd, _NormBase)
    assert all(isinstance(m, mode_dependent_layer_types()) for m in LAYERS)
    assert not isinstance(nn.LayerNorm(3), mode_dependent_layer_types())


def test_norm_and_dropout_fallback(public, caplog):
    types_ = mode_dependent_layer_types()
    assert all(
        t.__module__.startswith("torch.nn.modules") and not t.__name__.startswith("_")
        for t in types_
    )
    assert all(isinstance(m, types_) for m in LAYERS)
    from tdabench.task import AttributionTask

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.2))  # training mode
    with caplog.at_level("WARNING"):
        AttributionTask(lambda p, b: b[0].sum(), model, model.state_dict())
    assert "BatchNorm1d/Dropout" in caplog.text


# ---------------------------------------------------------------------- nn.Linear.forward replaced
def test_linear_forward_replacement_routes_through_stacked_linear(monkeypatch):
    assert _vmap_linear.linear_patch_works()
    calls = []
    real = _vmap_linear.StackedLinear.apply
    monkeypatch.setattr(_vmap_linear.StackedLinear, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(DT)
    ref = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(DT)
    ref.load_state_dict(model.state_dict())
    assert _vmap_linear.patch_linear_layers(model) == 2
    x = torch.randn(5, 4, dtype=DT)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert len(calls) == 2
    # under vmap over stacked weights (the trainer's use), the same as a per-model loop
    W = torch.randn(6, 3, 4, dtype=DT)
    b = torch.randn(6, 3, dtype=DT)
    stacked = vmap(
        lambda w, bb: torch.func.functional_call(model[0], {"weight": w, "bias": bb}, (x,))
    )(W, b)
    loop = torch.stack([F.linear(x, W[i], b[i]) for i in range(6)])
    torch.testing.assert_close(stacked, loop, rtol=1e-12, atol=1e-12)


def test_linear_forward_fallback(public):
    assert not _vmap_linear.linear_patch_works()
    model = nn.Sequential(nn.Linear(4, 3))
    assert _vmap_linear.patch_linear_layers(model) == 0
    assert "forward" not in vars(model[0])  # untouched: a plain nn.Linear


# ------------------------------------------------- _BatchNorm / _NormBase for the batched trainers
NORMS = [
    nn.BatchNorm1d(3),
    nn.BatchNorm2d(3),
    nn.BatchNorm3d(3),
    nn.SyncBatchNorm(3),
    nn.LazyBatchNorm1d(),
    nn.InstanceNorm1d(3, track_running_stats=True),
    nn.InstanceNorm2d(3),
    nn.LazyInstanceNorm3d(),
]


def _is_batch_norm(m: nn.Module) -> bool:
    return "BatchNorm" in type(m).__name__


def test_private_batch_norm_bases():
    from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

    assert batch_norm_types() == (_BatchNorm,)
    assert running_stat_norm_types() == (_NormBase,)


@pytest.mark.parametrize("private", [True, False])
def test_batch_norm_types_agree_with_and_without_private_api(private, monkeypatch):
    if not private:
        monkeypatch.setenv("TDABENCH_PUBLIC_TORCH_ONLY", "1")
        assert all(not t.__name__.startswith("_") for t in batch_norm_types())
    for m in NORMS:
        assert isinstance(m, batch_norm_types()) == _is_batch_norm(m), type(m).__name__
        assert isinstance(m, running_stat_norm_types()), type(m).__name__
    for m in (nn.LayerNorm(3), nn.GroupNorm(1, 3), nn.Dropout(0.1)):
        assert not isinstance(m, batch_norm_types() + running_stat_norm_types())
