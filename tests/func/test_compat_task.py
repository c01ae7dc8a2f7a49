"""dattri's AttributionTask accessors (get_param, get_loss_func, get_grad_loss_func, ...)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tdabench.errors import ConfigError
from tdabench.task import AttributionTask


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    other = {k: v + 0.5 for k, v in model.state_dict().items()}

    def loss(params, data):
        x, y = data
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    task = AttributionTask(loss, model, [model.state_dict(), other])
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 2, (5,), generator=g),
    )
    return task, model, other, loss, x, y


def _manual_grads(model, state, x, y):
    """Oracle: autograd on one sample at a time, eval mode."""
    ref = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    ref.load_state_dict(state)
    ref.eval()
    rows = []
    for i in range(x.shape[0]):
        ref.zero_grad()
        F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in ref.parameters()]))
    return torch.stack(rows)


def test_get_param_and_grad_loss_func_match_per_sample_autograd():
    task, model, other, _, x, y = _setup()
    flat, none = task.get_param(ckpt_idx=1)
    assert none is None and torch.equal(flat, torch.cat([other[k].reshape(-1) for k in other]))
    assert not model.training  # loading through the dattri accessors sets eval mode, as dattri
    grads = task.get_grad_loss_func()(flat, (x.unsqueeze(0), y.unsqueeze(0)))
    torch.testing.assert_close(grads, _manual_grads(model, other, x, y), rtol=0, atol=1e-12)
    part, _ = task.get_param(ckpt_idx=1, layer_name=["2.weight", "2.bias"])
    g_part = task.get_grad_loss_func(layer_name=["2.weight", "2.bias"], ckpt_idx=1)(
        part, (x.unsqueeze(0), y.unsqueeze(0))
    )
    torch.testing.assert_close(g_part, grads[:, -part.numel() :], rtol=0, atol=1e-12)
    tgt = task.get_grad_target_func(in_dims=(None, 0))(
        flat, (x, y)
    )  # per sample without the extra dim
    assert tgt.shape == grads.shape


def test_loss_func_forms_and_layer_split():
    task, model, other, loss, x, y = _setup()
    flat, _ = task.get_param(ckpt_idx=1)
    assert task.get_loss_func(flatten=False) is loss and task.get_target_func(flatten=False) is loss
    expect = loss({k: v for k, v in other.items()}, (x, y))
    torch.testing.assert_close(task.get_loss_func()(flat, (x, y)), expect, rtol=0, atol=1e-14)
    w = other["0.weight"].reshape(-1)
    f0 = task.get_loss_func(layer_name="0.weight", ckpt_idx=1)
    torch.testing.assert_close(f0(w, (x, y)), expect, rtol=0, atol=1e-14)
    with pytest.raises(ConfigError):
        task.get_loss_func(flatten=False, layer_name="0.weight")
    pieces, layer_map = task.get_param(ckpt_idx=1, layer_split=True)
    assert layer_map == [0, 0, 1, 1] and [p.numel() for p in pieces] == [12, 4, 8, 2]
    assert task.get_param(layer_split=True, param_layer_map=[0, 1, 2, 3])[1] == [0, 1, 2, 3]
    with pytest.raises(ConfigError):
        task.get_param(layer_split=True, param_layer_map=[0])
    assert task.get_model() is model and len(task.get_checkpoints()) == 2
