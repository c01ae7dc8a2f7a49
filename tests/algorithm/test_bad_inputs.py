"""Loaders that do not fit the model fail before any gradient work, with typed errors that name
the loader and the fix (issue 14's raw tracebacks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import GradDotAttributor, IFAttributorCG, TRAKAttributor
from tdabench.errors import ConfigError, DataError
from tdabench.task import AttributionTask


def _task(reduction="mean"):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(
            functional_call(model, params, (x,)), y, reduction=reduction
        )

    return model, AttributionTask(loss, model, model.state_dict(), sample_mode="batch")


def _loader(x, y=None, batch_size=4):
    ds = TensorDataset(x) if y is None else TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size)


GOOD = _loader(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (_loader(torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))), "input shape"),
        (_loader(torch.randint(0, 5, (6, 4)), torch.randint(0, 3, (6,))), "not int64"),
        (_loader(torch.randn(6, 4, dtype=torch.float64), torch.full((6,), 7)), "labels within"),
        (_loader(torch.randn(6, 4, dtype=torch.float64)), r"\(inputs, labels\)"),
    ],
    ids=["width", "int64", "label-range", "no-labels"],
)
def test_bad_test_loader_is_named(bad, match):
    _, task = _task()
    attributor = GradDotAttributor(task)
    with pytest.raises(DataError, match=f"test loader.*{match}"):
        attributor.attribute(GOOD, bad)


def test_three_element_batches_in_the_cache_loader():
    _, task = _task()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    three = DataLoader(TensorDataset(x, y, y), batch_size=4)
    with pytest.raises(DataError, match="loss_func"):
        IFAttributorCG(task, regularization=0.1).cache(three)


def test_vector_valued_loss_is_a_config_error():
    _, task = _task(reduction="none")
    with pytest.raises(ConfigError, match=r"scalar.*reduction='mean'"):
        TRAKAttributor(task, task.loss_func, projector_kwargs={"proj_dim": 2}).cache(GOOD)
