"""AttributionTask's sample_mode: dattri's per-sample loss convention gives the same scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import GradDotAttributor, IFAttributorCG, TracInAttributor
from tdabench.errors import ConfigError
from tdabench.task import AttributionTask

DT = torch.float64


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).to(DT)
    x = torch.randn(16, 3, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (16,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    return model, loader


def _batch_loss(model):
    def f(params, data):  # tdabench's convention: a batch, mean loss
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return f


def _sample_loss(model):
    def f(params, data):  # dattri's convention: one unbatched sample, batch dim added here
        x, y = data
        return nn.functional.cross_entropy(
            functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0)
        )

    return f


@pytest.mark.parametrize(
    "make",
    [
        lambda t: GradDotAttributor(t),
        lambda t: TracInAttributor(t, weight_list=torch.ones(1), normalized_grad=True),
        lambda t: IFAttributorCG(t, max_iter=30, regularization=0.1),
    ],
)
def test_dattri_convention_gives_the_same_scores(setup, make):
    model, loader = setup
    ours = AttributionTask(_batch_loss(model), model, model.state_dict())
    theirs = AttributionTask(_sample_loss(model), model, model.state_dict())
    out = []
    for task in (ours, theirs):
        a = make(task)
        a.cache(loader)
        out.append(a.attribute(loader, loader))
    assert ours.sample_mode == "batch" and theirs.sample_mode == "sample"
    torch.testing.assert_close(out[0], out[1], rtol=1e-9, atol=1e-12)


def test_sample_mode_loss_has_batch_semantics(setup):
    model, loader = setup
    x, y = next(iter(loader))
    task = AttributionTask(_sample_loss(model), model, model.state_dict())
    params = dict(model.named_parameters())
    expected = _batch_loss(model)(params, (x, y))
    torch.testing.assert_close(task.loss_func(params, (x, y)), expected)
    # dattri's accessors hand out the user's own function
    assert task.get_loss_func(flatten=False) is task.original_loss_func


def test_function_working_both_ways_with_different_values_is_refused(setup):
    model, loader = setup

    def summed(params, data):  # a batch SUM: per sample it also works, but means something else
        x, y = data
        x = x if x.dim() == 3 else x.unsqueeze(0)
        y = y if y.dim() == 1 else y.unsqueeze(0)
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y, reduction="sum")

    task = AttributionTask(summed, model, model.state_dict())
    with pytest.raises(ConfigError, match="sample_mode='batch'"):
        task.resolve_sample_mode(next(iter(loader)))
    explicit = AttributionTask(summed, model, model.state_dict(), sample_mode="batch")
    assert explicit.resolve_sample_mode(next(iter(loader))) == "batch"


def test_bad_sample_mode_and_broken_loss(setup):
    model, loader = setup
    with pytest.raises(ConfigError, match="sample_mode"):
        AttributionTask(_batch_loss(model), model, model.state_dict(), sample_mode="rows")

    def broken(params, data):
        raise RuntimeError("boom")

    task = AttributionTask(broken, model, model.state_dict())
    with pytest.raises(ConfigError, match="fails on a batch"):
        task.resolve_sample_mode(next(iter(loader)))
