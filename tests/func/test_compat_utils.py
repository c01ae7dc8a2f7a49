"""dattri's func.utils names: flatten_func, partial_param, get_parameter_chunk_sizes (exact oracles)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tdabench.errors import ConfigError, ShapeError
from tdabench.func.utils import (
    flatten_func,
    flatten_params,
    get_parameter_chunk_sizes,
    partial_param,
)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    m[0].bias.requires_grad_(False)  # frozen: not part of the flat vector
    return m


def _loss(model, params, x):
    return functional_call(model, params, (x,)).pow(2).sum()


def test_flatten_func_unflattens_trainable_params_in_model_order(model):
    x = torch.randn(5, 3, dtype=torch.float64)
    named = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    assert list(named) == ["0.weight", "2.weight", "2.bias"]
    frozen = {"0.bias": model[0].bias.detach()}

    @flatten_func(model)
    def f(params, x):
        return _loss(model, {**frozen, **params}, x)

    flat = torch.cat([named[k].reshape(-1) for k in named])  # oracle layout: model order
    expected = _loss(model, dict(model.named_parameters()), x)
    assert torch.equal(f(flat, x), expected)
    assert torch.equal(f(flat, x), f(flatten_params(named), x))
    # layer-wise tuple and a named dict give the same value
    assert torch.equal(f(tuple(named.values()), x), expected)
    assert torch.equal(f(named, x), expected)
    # gradients w.r.t. the flat vector are the concatenated per-parameter gradients
    g = torch.func.grad(f)(flat, x)
    model.zero_grad()
    _loss(model, dict(model.named_parameters()), x).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(g, ref, rtol=0, atol=1e-12)


def test_flatten_func_param_num_and_errors(model):
    x = torch.randn(2, 3, dtype=torch.float64)
    named = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

    @flatten_func(model, param_num=1)
    def g(x, params):
        return _loss(model, {"0.bias": model[0].bias.detach(), **params}, x)

    assert torch.equal(g(x, flatten_params(named)), _loss(model, dict(model.named_parameters()), x))
    with pytest.raises(ShapeError):
        g(x, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ShapeError):
        g(x, (torch.zeros(1),))
    with pytest.raises(ConfigError):
        flatten_func(model, param_num=3)(lambda a: a)(x)


def test_partial_param_splices_selected_layers_without_mutating():
    full = {
        "a": torch.arange(3.0),
        "b": torch.arange(4.0).reshape(2, 2) + 10,
        "c": torch.tensor([7.0]),
    }
    snapshot = {k: v.clone() for k, v in full.items()}

    @partial_param(full, ["c", "a"])
    def f(flat, scale):
        return flat * scale

    part = torch.tensor([100.0, -1.0, -2.0, -3.0])  # c (1 value) then a (3 values)
    out = f(part, 2.0)
    oracle = torch.tensor([-1.0, -2.0, -3.0, 10.0, 11.0, 12.0, 13.0, 100.0]) * 2.0  # a, b, c order
    assert torch.equal(out, oracle)
    for k in full:
        assert torch.equal(full[k], snapshot[k])
    with pytest.raises(ShapeError):
        f(torch.zeros(3), 1.0)
    with pytest.raises(ConfigError):
        partial_param(full, ["zz"])


@pytest.mark.parametrize(
    ("counts", "chunks"),
    [
        ([3, 3], [6]),  # 6 < 7: one chunk
        ([3, 4], [3, 4]),  # 3 + 4 reaches 7: close before the 4
        ([10], [7, 3]),  # a count of 7 or more is split into full chunks plus its remainder
        ([2, 16, 1], [2, 7, 7, 3]),
        ([7], [7]),
        ([], [0]),
    ],
)
def test_get_parameter_chunk_sizes_hand_computed(counts, chunks):
    # batch_size 2**28 gives max_chunk_size (2**32 - 1) // 2**29 = 7
    max_chunk, got = get_parameter_chunk_sizes(counts, 2**28)
    assert max_chunk == 7
    assert got == chunks
    assert sum(got) == sum(counts)


def test_get_parameter_chunk_sizes_real_batch():
    max_chunk, got = get_parameter_chunk_sizes([1000, 2000], 32)
    assert max_chunk == (2**32 - 1) // 64 and got == [3000]
    with pytest.raises(ConfigError):
        get_parameter_chunk_sizes([1], 0)
