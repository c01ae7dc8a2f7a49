"""Tests of tdabench.model_util.dropout: mode switches and mask ensembles vs hand-applied masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tdabench.errors import ConfigError
from tdabench.model_util import activate_dropout, dropout_checkpoints
from tdabench.model_util.dropout import dropout_masks

DT = torch.float64


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(8, 5),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(5, 3),
    ).to(DT)


class Convnet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def test_activate_dropout_modes_and_prob():
    m = mlp().train()
    out = activate_dropout(m)
    assert out is m
    assert [x.training for x in m] == [False, False, True, False, False, True, False]
    assert not m.training
    activate_dropout(m, layer_positions=[1], dropout_prob=0.3)
    assert [x.training for x in m] == [False, False, False, False, False, True, False]
    assert m[5].p == 0.3 and m[2].p == 0.5
    activate_dropout(m, layer_positions=["2"])
    assert m[2].training and not m[5].training
    activate_dropout(m, layer_positions=-1)
    assert m[5].training and not m[2].training
    # Active dropout is random, inactive model is deterministic.
    x = torch.randn(50, 6, dtype=DT)
    activate_dropout(m, dropout_prob=0.5)
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


def test_activate_dropout_errors():
    m = mlp()
    with pytest.raises(ConfigError, match="out of range"):
        activate_dropout(m, layer_positions=[2])
    with pytest.raises(ConfigError, match="not a dropout module"):
        activate_dropout(m, layer_positions=["0"])
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        activate_dropout(m, dropout_prob=1.0)
    with pytest.raises(ConfigError, match="no dropout layer"):
        activate_dropout(nn.Linear(3, 2))


def _hand_forward(
    model: nn.Module, masks: dict[str, torch.Tensor], p: float, x: torch.Tensor
) -> torch.Tensor:
    """Original weights; the mask is multiplied into each selected layer's INPUT by a hook."""
    mods = dict(model.named_modules())
    handles = []
    for name, mask in masks.items():
        shape = (1, -1) if isinstance(mods[name], nn.Linear) else (1, -1, 1, 1)
        scale = mask.to(DT).reshape(shape) / (1 - p)
        handles.append(mods[name].register_forward_pre_hook(lambda _m, inp, s=scale: (inp[0] * s,)))
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


def _member_forward(model: nn.Module, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(model, sd, (x,))


def test_mlp_members_equal_hand_masked_forward():
    m = mlp().eval()
    p, k = 0.3, 4
    sds = dropout_checkpoints(m, k, dropout_prob=p, seed=7)
    masks = dropout_masks(m, k, dropout_prob=p, seed=7)
    assert set(masks[0]) == {"3", "6"}  # the Linear layers after each Dropout
    assert masks[0]["3"].shape == (8,) and masks[0]["6"].shape == (5,)
    x = torch.randn(20, 6, dtype=DT)
    outs = []
    for sd, mk in zip(sds, masks, strict=True):
        got = _member_forward(m, sd, x)
        torch.testing.assert_close(got, _hand_forward(m, mk, p, x), rtol=1e-12, atol=1e-12)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1])
    # The model itself is untouched and biases/unselected layers are unchanged.
    torch.testing.assert_close(sds[0]["0.weight"], m[0].weight.detach())
    torch.testing.assert_close(sds[0]["3.bias"], m[3].bias.detach())


def test_conv_members_equal_hand_masked_forward():
    m = Convnet().to(DT).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    p = 0.5
    sds = dropout_checkpoints(m, 3, dropout_prob=p, seed=1, layer_names=["conv2", "head"])
    masks = dropout_masks(m, 3, dropout_prob=p, seed=1, layer_names=["conv2", "head"])
    assert masks[0]["conv2"].shape == (4,)
    assert set(sds[0]) == set(m.state_dict())  # full state dict incl. BN buffers
    x = torch.randn(5, 2, 6, 6, dtype=DT)
    for sd, mk in zip(sds, masks, strict=True):
        torch.testing.assert_close(
            _member_forward(m, sd, x), _hand_forward(m, mk, p, x), rtol=1e-12, atol=1e-12
        )


def test_deterministic_in_seed_and_index():
    m = mlp()
    a = dropout_checkpoints(m, 2, seed=5)
    b = dropout_checkpoints(m, 3, seed=5)
    for sa, sb in zip(a, b, strict=False):  # member k depends only on (seed, k)
        for key in sa:
            assert torch.equal(sa[key], sb[key])
    c = dropout_checkpoints(m, 2, seed=6)
    assert not torch.equal(a[0]["3.weight"], c[0]["3.weight"])


def test_mask_keep_rate():
    m = nn.Sequential(nn.Linear(4, 3000), nn.Linear(3000, 2))
    masks = dropout_masks(m, 2, dropout_prob=0.3, seed=0)
    assert set(masks[0]) == {"1"}  # no dropout: every Linear but the first
    for mk in masks:
        assert abs(mk["1"].double().mean().item() - 0.7) < 0.03


def test_default_selection_errors_and_task_integration():
    with pytest.raises(ConfigError, match="layer_names"):
        dropout_checkpoints(nn.Sequential(nn.Linear(3, 2)), 2)
    m = mlp()
    with pytest.raises(ConfigError, match=r"only nn\.Linear"):
        dropout_checkpoints(m, 2, layer_names=["1"])
    with pytest.raises(ConfigError, match="not a module"):
        dropout_checkpoints(m, 2, layer_names=["fc9"])
    with pytest.raises(ConfigError, match="num_models"):
        dropout_checkpoints(m, 0)

    from tdabench.task import AttributionTask

    def loss_func(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(m, params, (x,)), y)

    sds = dropout_checkpoints(m, 3, dropout_prob=0.2, seed=0)
    task = AttributionTask(loss_func, m, checkpoints=sds)
    assert task.num_checkpoints == 3
    for i in range(3):
        assert torch.equal(task.get_params(i)["6.weight"], sds[i]["6.weight"])


DROPOUT_ERRORS = [
    (dict(layer_positions=[2]), "dropout position 2 out of range: the model has 2 dropout layers ['2', '5']"),
    (dict(layer_positions=[-3]), "dropout position -3 out of range: the model has 2 dropout layers ['2', '5']"),
    (dict(layer_positions=["0"]), "'0' is not a dropout module of the model; dropout modules: ['2', '5']"),
    (dict(layer_positions=["nope", 9]), "'nope' is not a dropout module of the model; dropout modules: ['2', '5']"),
    (dict(layer_positions=[True]), "layer_positions entries must be ints or module names, got True"),
    (dict(layer_positions=[0, 1.0]), "layer_positions entries must be ints or module names, got 1.0"),
    (dict(layer_positions=[0, 5]), "dropout position 5 out of range: the model has 2 dropout layers ['2', '5']"),
    (dict(dropout_prob=True), "dropout_prob must be a float in [0, 1), got True"),
    (dict(layer_positions=[9], dropout_prob=2.0), "dropout_prob must be a float in [0, 1), got 2.0"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "message"), DROPOUT_ERRORS)
def test_activate_dropout_error_messages_and_their_order(kwargs, message):
    """Pinned (issue 15's split of activate_dropout keeps every message and which fault wins)."""
    m = mlp().train()
    with pytest.raises(ConfigError) as err:
        activate_dropout(m, **kwargs)
    assert str(err.value) == message
    assert m.training  # nothing was changed


@pytest.mark.parametrize(
    ("positions", "active"),
    [
        (None, {2, 5}),
        (0, {2}),
        (-1, {5}),
        (-2, {2}),
        ("5", {5}),
        ([0, 0], {2}),
        (["5", 0, -1], {2, 5}),
        ((1, "2"), {2, 5}),
        ([], set()),
    ],
)
def test_activate_dropout_selection(positions, active):
    """Brute-force oracle: exactly the listed Sequential slots train, only they get the new p."""
    m = mlp().train()
    activate_dropout(m, layer_positions=positions, dropout_prob=0.25)
    assert [i for i, x in enumerate(m) if x.training] == sorted(active)
    assert [getattr(x, "p", None) for x in m] == [
        None, None, 0.25 if 2 in active else 0.5, None, None, 0.25 if 5 in active else 0.2, None
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"^model must be an nn\.Module, got str$"):
        activate_dropout("x", dropout_prob=2.0)
