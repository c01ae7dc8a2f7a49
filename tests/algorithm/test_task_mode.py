"""AttributionTask warns when a model with dropout / batch norm is left in training mode."""

from __future__ import annotations

import logging

import torch
from torch import nn

from tdabench.task import AttributionTask


def _loss(params, data):
    return torch.zeros(())


def test_training_mode_with_dropout_warns(caplog):
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.BatchNorm1d(4))
    with caplog.at_level(logging.WARNING, logger="tdabench.task"):
        AttributionTask(_loss, model, model.state_dict())
    assert "model.eval()" in caplog.text and "BatchNorm1d/Dropout" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tdabench.task"):
        AttributionTask(_loss, model.eval(), model.state_dict())
        AttributionTask(
            _loss, nn.Linear(3, 2), nn.Linear(3, 2).state_dict()
        )  # nothing mode-dependent
    assert caplog.text == ""
