"""DataInf against its formula computed densely (explicit per-layer inverses, float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import IFAttributorDataInf
from tdabench.algorithm.datainf import DataInfArguments, layer_groups
from tdabench.errors import ConfigError, NotCachedError, ShapeError
from tdabench.task import AttributionTask


@pytest.fixture(autouse=True)
def _float64_default():
    """float64 by default inside this module's tests only (restored after each test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(11, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=g)

    def loss(params, data):
        xb, yb = data
        return nn.functional.cross_entropy(functional_call(model, params, (xb,)), yb)

    def target(params, data):  # a target different from the loss (exercises both sides)
        xb, yb = data
        logits = functional_call(model, params, (xb,))
        return -logits.gather(1, yb[:, None]).mean() + 0.1 * logits.pow(2).mean()

    task = AttributionTask(
        loss, model, {k: v.clone() for k, v in model.state_dict().items()}, target_func=target
    )
    return model, task, x, y


def _dense_grads(model, fn, x, y):
    """Per-sample gradients by one autograd call per sample (independent of tdabench)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        val = fn(params, (x[i : i + 1], y[i : i + 1]))
        gs = torch.autograd.grad(val, list(params.values()))
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def _dense_datainf(G_fim, lam, layers):
    """Block-diagonal (1/n) Σ_i (g_i g_iᵀ + λ_l I)^{-1} with explicit inverses."""
    d = G_fim.shape[1]
    M = torch.zeros(d, d)
    for li, (_, a, b) in enumerate(layers):
        eye = torch.eye(b - a)
        inv = sum(torch.linalg.inv(torch.outer(g, g) + lam[li] * eye) for g in G_fim[:, a:b])
        M[a:b, a:b] = inv / G_fim.shape[0]
    return M


def _loaders(x, y, tr=(0, 11), te=(0, 4), bs=3):
    train = DataLoader(TensorDataset(x[tr[0] : tr[1]], y[tr[0] : tr[1]]), batch_size=bs)
    test = DataLoader(TensorDataset(x[te[0] : te[1]], y[te[0] : te[1]]), batch_size=2)
    return train, test


@pytest.mark.parametrize("regularization", [0.0, 0.3, None])
def test_datainf_matches_dense_formula(regularization):
    model, task, x, y = _problem()
    train, test = _loaders(x, y)
    att = IFAttributorDataInf(task, regularization=regularization)
    att.cache(train)
    scores = att.attribute(train, test)
    G = _dense_grads(model, task.loss_func, x, y)
    T = _dense_grads(model, task.target_func, x[:4], y[:4])
    layers = [("0", 0, 16), ("2", 16, 31)]
    assert att.layers == layers
    if regularization is None:
        lam = [0.1, 0.1]
    elif regularization > 0:
        lam = [regularization] * 2
    else:  # the paper's rule: 0.1 x mean squared gradient entry of the layer
        lam = [0.1 * G[:, a:b].pow(2).sum().item() / (11 * (b - a)) for _, a, b in layers]
    assert list(att.regularization_per_layer().values()) == pytest.approx(lam, rel=1e-12)
    expected = G @ _dense_datainf(G, lam, layers) @ T.T
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(
        att.self_attribute(train),
        torch.diagonal(
            G @ _dense_datainf(G, lam, layers) @ _dense_grads(model, task.target_func, x, y).T
        ),
        rtol=1e-9,
        atol=1e-11,
    )
    assert torch.isfinite(scores).all()


def test_datainf_ratio_layer_selection_and_batching():
    model, task, x, y = _problem(1)
    # ratio 0.5 of 3 batches of 4 (dattri: a ratio of batches) -> the first 2 batches, 8 samples;
    # only the last layer
    att = IFAttributorDataInf(
        task, layer_name="2", regularization=0.05, fim_estimate_data_ratio=0.5
    )
    train, test = _loaders(x, y, bs=4)
    att.cache(train)
    G_all = _dense_grads(model, task.loss_func, x, y)[:, 16:]
    T = _dense_grads(model, task.target_func, x[:4], y[:4])[:, 16:]
    M = _dense_datainf(G_all[:8], [0.05], [("2", 0, 15)])
    torch.testing.assert_close(att.attribute(train, test), G_all @ M @ T.T, rtol=1e-9, atol=1e-11)
    # the same Fisher samples from another batching, and without keeping the gradients
    other = IFAttributorDataInf(
        task, layer_name="2", regularization=0.05, fim_estimate_data_ratio=0.6, memory_budget=64
    )
    other.cache(
        DataLoader(TensorDataset(x, y), batch_size=2)
    )  # ceil(0.6 * 6) = 4 batches, 8 samples
    assert other._stored is None  # recomputed in pieces, not kept
    torch.testing.assert_close(
        other.attribute(train, test), att.attribute(train, test), rtol=1e-10, atol=1e-12
    )


def test_datainf_checkpoint_average():
    model, task, x, y = _problem(2)
    sd1 = {k: v.clone() for k, v in model.state_dict().items()}
    sd2 = {k: v + 0.1 for k, v in sd1.items()}
    task2 = AttributionTask(task.loss_func, model, [sd1, sd2])
    train, test = _loaders(x, y)
    both = IFAttributorDataInf(task2, regularization=0.2)
    both.cache(train)
    parts = []
    for sd in (sd1, sd2):
        single = IFAttributorDataInf(AttributionTask(task.loss_func, model, sd), regularization=0.2)
        single.cache(train)
        parts.append(single.attribute(train, test))
    torch.testing.assert_close(
        both.attribute(train, test), (parts[0] + parts[1]) / 2, rtol=1e-10, atol=1e-12
    )


def test_datainf_arguments_and_errors():
    with pytest.raises(ConfigError, match="regularization"):
        DataInfArguments(regularization=-1.0)
    with pytest.raises(ConfigError, match="fim_estimate_data_ratio"):
        DataInfArguments(fim_estimate_data_ratio=0.0)
    with pytest.raises(ConfigError, match="regularization_scale"):
        DataInfArguments(regularization_scale=math.inf)
    assert DataInfArguments(0.5, 1.0).result_dict() == {
        "regularization": 0.5,
        "fim_estimate_data_ratio": 1.0,
        "regularization_scale": 0.1,
        "layer_name": None,
    }
    from tdabench.algorithm.arguments import arguments_for

    assert arguments_for("IFAttributorDataInf") is DataInfArguments
    with pytest.raises(ConfigError, match="unknown argument"):
        DataInfArguments.from_dict({"damping": 1.0})
    _, task, x, y = _problem()
    att = IFAttributorDataInf(task)
    train, test = _loaders(x, y)
    with pytest.raises(NotCachedError):
        att.attribute(train, test)
    assert layer_groups(["a.w", "a.b", "b.w", "c"], [2, 1, 3, 1]) == [
        ("a", 0, 3),
        ("b", 3, 6),
        ("", 6, 7),
    ]


def test_datainf_transform_test_rep_and_dattri_internals():
    """dattri's ``transform_test_rep`` is the dense ``M V`` per layer; ``_cached_train_reps`` holds
    the per-sample gradients of the first ``ceil(ratio * batches)`` batches."""
    model, task, x, y = _problem(3)
    att = IFAttributorDataInf(task, regularization=1e-3, fim_estimate_data_ratio=0.5)
    att.cache(_loaders(x, y, bs=2)[0])  # 6 batches -> 3 -> 6 samples
    G = _dense_grads(model, task.loss_func, x, y)
    reps = att._cached_train_reps[0]
    torch.testing.assert_close(reps, G[:6], rtol=1e-10, atol=1e-12)
    layers = [("0", 0, 16), ("2", 16, 31)]
    V = torch.randn(5, 31, generator=torch.Generator().manual_seed(4))
    want = V @ _dense_datainf(G[:6], [1e-3, 1e-3], layers).T
    torch.testing.assert_close(att.transform_test_rep(0, V), want, rtol=1e-8, atol=1e-9)
    parts = att._get_layer_wise_reps(0, V)
    assert [p.shape[1] for p in parts] == [16, 15] and torch.equal(torch.cat(parts, dim=1), V)
    with pytest.raises(ConfigError, match="ckpt_idx"):
        att.transform_test_rep(2, V)
    with pytest.raises(ShapeError):
        att.transform_test_rep(0, V[:, :30])
