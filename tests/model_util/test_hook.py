"""model_util.hook.get_final_layer_io and model_util.ensemble (dattri's names)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdabench.errors import ConfigError, DataError
from tdabench.model_util import dropout, ensemble
from tdabench.model_util.hook import get_final_layer_io


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_final_layer_io_equals_manual_forward():
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(7, 3, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, torch.zeros(7)), batch_size=3)
    feat, out = get_final_layer_io(model, "head", loader)
    with torch.no_grad():
        ref_feat = torch.relu(x @ model.body[0].weight.T + model.body[0].bias)
        ref_out = ref_feat @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(feat, ref_feat, rtol=0, atol=1e-14)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-14)
    # dotted names reach nested layers; bare-tensor loaders work too
    feat0, out0 = get_final_layer_io(model, "body.0", DataLoader(x, batch_size=4))
    torch.testing.assert_close(feat0, x, rtol=0, atol=0)
    assert out0.shape == (7, 5)
    assert not model.head._forward_hooks  # the hook was removed


def test_final_layer_io_errors():
    model = Net()
    loader = DataLoader(TensorDataset(torch.randn(2, 3), torch.zeros(2)), batch_size=2)
    with pytest.raises(ConfigError, match="no layer"):
        get_final_layer_io(model, "nope", loader)
    twice = nn.Sequential(nn.Linear(3, 3))
    twice.forward = lambda x: twice[0](twice[0](x))
    with pytest.raises(ConfigError, match="2 times"):
        get_final_layer_io(twice, "0", loader)
    with pytest.raises(DataError):
        get_final_layer_io(model, "head", [])


def test_ensemble_module_exposes_the_dropout_ensembles():
    assert ensemble.dropout_checkpoints is dropout.dropout_checkpoints
    assert ensemble.dropout_masks is dropout.dropout_masks
