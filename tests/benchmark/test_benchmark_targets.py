"""Loss and target functions against direct formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdabench.benchmark.targets import make_loss_func, make_target_func, margin_from_logits
from tdabench.errors import ConfigError, ShapeError


class _Seq(nn.Module):
    def __init__(self, V: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, V)

    def forward(self, idx):
        return self.emb(idx)


def test_classification_targets() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    params = dict(model.named_parameters())
    logits = model(x)
    torch.testing.assert_close(
        make_loss_func(model, "classification")(params, (x, y)), F.cross_entropy(logits, y)
    )
    torch.testing.assert_close(
        make_target_func(model, "classification", "neg_loss")(params, (x, y)),
        -F.cross_entropy(logits, y),
    )
    p = logits.softmax(-1).gather(1, y[:, None]).squeeze(1)
    expect = (p.log() - (1 - p).log()).mean()  # margin = log p - log(1 - p)
    torch.testing.assert_close(
        make_target_func(model, "classification", "margin")(params, (x, y)), expect
    )
    # per-row margin by brute force
    m = margin_from_logits(logits, y)
    for i in range(6):
        others = torch.cat([logits[i, : y[i]], logits[i, y[i] + 1 :]])
        torch.testing.assert_close(m[i], logits[i, y[i]] - others.logsumexp(0))


def test_float64_params_with_float32_inputs() -> None:
    model = nn.Linear(4, 3).double()
    params = dict(model.named_parameters())
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    out = make_loss_func(model, "classification")(params, (x, y))
    assert out.dtype == torch.float64


def test_sequence_targets_are_per_sequence_token_means() -> None:
    torch.manual_seed(0)
    model = _Seq()
    x, y = torch.randint(0, 5, (3, 7)), torch.randint(0, 5, (3, 7))
    params = dict(model.named_parameters())
    loss = make_loss_func(model, "sequence")
    logits = model(x)
    per_seq = torch.stack([F.cross_entropy(logits[i], y[i]) for i in range(3)])
    torch.testing.assert_close(loss(params, (x, y)), per_seq.mean())
    torch.testing.assert_close(loss(params, (x[1:2], y[1:2])), per_seq[1])
    neg = make_target_func(model, "sequence", "neg_loss")
    torch.testing.assert_close(neg(params, (x[:1], y[:1])), -per_seq[0])
    mar = make_target_func(model, "sequence", "margin")(params, (x, y))
    torch.testing.assert_close(mar, margin_from_logits(logits, y).mean())
    with pytest.raises(ShapeError):
        loss(params, (x, y[:, :3]))


def test_bad_names() -> None:
    with pytest.raises(ConfigError):
        make_loss_func(nn.Linear(2, 2), "regression")
    with pytest.raises(ConfigError):
        make_target_func(nn.Linear(2, 2), "classification", "accuracy")
