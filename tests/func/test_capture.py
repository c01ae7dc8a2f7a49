"""Oracle tests of func/capture.py: Σ_t g aᵀ equals torch.func's per-sample weight gradients."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from tdabench.errors import ConfigError
from tdabench.func.capture import capture_task, layer_param_names, select_modules
from tdabench.task import AttributionTask


@pytest.fixture(autouse=True)
def _float64_default():
    """float64 by default inside this module's tests only (restored after each test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _per_sample_oracle(model: nn.Module, loss_func, batch):
    """{param name: (B, *shape)} per-sample gradients by vmap(grad) on batches of one."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, *sample):
        return loss_func(p, tuple(s.unsqueeze(0) for s in sample))

    return vmap(grad(one), in_dims=(None, *([0] * len(batch))))(params, *batch)


def _check(task: AttributionTask, batch, names=None) -> None:
    modules = select_modules(task.model, names)
    io = capture_task(task, batch, modules)
    oracle = _per_sample_oracle(task.model, task.loss_func, batch)
    for name, m in modules.items():
        G = io[name].per_sample_grad()  # (B, d_out, d_in')
        pnames = layer_param_names(name, m)
        w = oracle[pnames[0]].reshape(G.shape[0], G.shape[1], -1)
        want = torch.cat([w, oracle[pnames[1]].unsqueeze(-1)], dim=-1) if len(pnames) == 2 else w
        torch.testing.assert_close(G, want, rtol=1e-10, atol=1e-12)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 4)
        self.fc2 = nn.Linear(4, 3, bias=False)
        self.norm = nn.LayerNorm(3)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        return self.out(self.norm(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))


def _ce_task(model: nn.Module) -> AttributionTask:
    model.eval()

    def loss(params, data):
        x, y = data
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return AttributionTask(loss, model, model.state_dict())


def test_linear_mlp_matches_torch_func() -> None:
    torch.manual_seed(0)
    task = _ce_task(_MLP())
    batch = (torch.randn(7, 5), torch.randint(0, 3, (7,)))
    _check(task, batch)


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, dilation=1)
        self.c2 = nn.Conv2d(3, 2, kernel_size=(2, 3), padding=(1, 0), dilation=(1, 2), bias=False)
        self.fc = nn.Linear(2 * 5 * 1, 3)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.fc(h.flatten(1))


def test_conv2d_matches_torch_func() -> None:
    torch.manual_seed(1)
    model = _Conv()
    x = torch.randn(4, 2, 8, 9)
    assert model(x).shape == (4, 3)
    task = _ce_task(model)
    _check(task, (x, torch.randint(0, 3, (4,))))


class _Seq(nn.Module):
    """Token model (B, T, d): shared projection applied twice (weight sharing) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(torch.tanh(self.proj(x)))))


def test_sequence_and_weight_sharing_keep_the_token_axis() -> None:
    torch.manual_seed(2)
    model = _Seq()
    model.eval()

    def loss(params, data):  # mean over B * T tokens
        x, y = data
        logits = functional_call(model, params, (x,))
        return F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))

    task = AttributionTask(loss, model, model.state_dict())
    batch = (torch.randn(3, 6, 4), torch.randint(0, 5, (3, 6)))
    io = capture_task(task, batch, select_modules(model))
    assert io["head"].a.shape == (3, 6, 5) and io["head"].g.shape == (3, 6, 5)
    assert io["proj"].a.shape == (3, 12, 5)  # two calls concatenated along T
    _check(task, batch)


def test_target_func_and_selection() -> None:
    torch.manual_seed(3)
    model = _MLP()
    model.eval()

    def target(params, data):
        x, _ = data
        return functional_call(model, params, (x,)).pow(2).sum(-1).mean()

    task = AttributionTask(_ce_task(model).loss_func, model, model.state_dict(), target_func=target)
    batch = (torch.randn(5, 5), torch.randint(0, 3, (5,)))
    modules = select_modules(model, ["fc1", "out"])
    io = capture_task(task, batch, modules, which="target")
    oracle = _per_sample_oracle(model, target, batch)
    torch.testing.assert_close(
        io["out"].per_sample_grad()[:, :, :3], oracle["out.weight"], rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        io["fc1"].per_sample_grad()[:, :, -1], oracle["fc1.bias"], rtol=1e-10, atol=1e-12
    )


def test_unsupported_modules_are_skipped_with_a_notice(caplog) -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2)
    )
    with caplog.at_level(logging.INFO, logger="tdabench.func.capture"):
        mods = select_modules(model)
    assert list(mods) == ["3"]
    assert "'0'" in caplog.text and "groups=2" in caplog.text and "LayerNorm" in caplog.text
    with caplog.at_level(logging.WARNING, logger="tdabench.func.capture"):
        assert list(select_modules(model, ["2", "3"])) == ["3"]
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight  # named_parameters() lists it once, as "0.weight"
    with caplog.at_level(logging.INFO, logger="tdabench.func.capture"):
        assert list(select_modules(tied)) == ["0"]
    assert "tied" in caplog.text
    with pytest.raises(ConfigError, match="not found"):
        select_modules(model, "nope")
    with pytest.raises(ConfigError, match=r"no nn\.Linear"):
        select_modules(model, ["2"])
