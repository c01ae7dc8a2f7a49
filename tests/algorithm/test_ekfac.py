"""IFAttributorEKFAC / IFAttributorKFAC against the dense formula G_train (F + λ)⁻¹ G_testᵀ with
per-sample gradients from torch.func (float64), plus the dattri call shape and argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import tdabench.func.kfac as kfac_mod
from tdabench.algorithm import IFAttributorEKFAC, IFAttributorKFAC
from tdabench.algorithm.ekfac import EKFACArguments
from tdabench.errors import ConfigError, NonFiniteError, ShapeError
from tdabench.task import AttributionTask


@pytest.fixture(autouse=True)
def _float64_default():
    """float64 by default inside this module's tests only (restored after each test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3, padding=1)
        self.fc1 = nn.Linear(2 * 4 * 4, 5, bias=False)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.c(x)).flatten(1))))


def _task(model: nn.Module, checkpoints=None) -> AttributionTask:
    model.eval()

    def loss(p, d):
        return F.cross_entropy(functional_call(model, p, (d[0],)), d[1])

    def target(p, d):  # a different target: the log-probability margin of the label
        logits = functional_call(model, p, (d[0],))
        return -(logits.gather(1, d[1][:, None]).squeeze(1) - logits.logsumexp(1)).mean() * 0.5

    return AttributionTask(loss, model, checkpoints or model.state_dict(), target_func=target)


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _grads(task: AttributionTask, func, x, y, names, k: int = 0) -> torch.Tensor:
    params = task.get_params(k)

    def one(p, xi, yi):
        return func(p, (xi[None], yi[None]))

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], dim=1)


def _dense_scores(att, task, train, test, k: int = 0) -> torch.Tensor:
    op = att.operators[k]
    spec = op.spec
    lams = [lf.damping(att.args.damping, att.args.damping_factor) for lf in op.layers]
    D = torch.diag(
        torch.cat(
            [
                torch.full((lf.shape[0] * lf.shape[1],), lam)
                for lf, lam in zip(op.layers, lams, strict=True)
            ]
        )
    )
    Pm = op.from_layers(
        op.to_layers(torch.eye(spec.dim))
    )  # identity; the dense matrix is in spec order
    assert torch.equal(Pm, torch.eye(spec.dim))
    g_train = _grads(task, task.loss_func, *train, spec.names, k)
    g_test = _grads(task, task.target_func, *test, spec.names, k)
    return g_train @ torch.linalg.solve(op.dense() + D, g_test.T)


@pytest.mark.parametrize(
    ("cls", "damping", "factor"),
    [
        (IFAttributorEKFAC, 1e-2, None),
        (IFAttributorKFAC, 0.0, 0.1),
        (IFAttributorEKFAC, 1e-3, 0.05),
    ],
)
def test_scores_match_the_dense_formula(cls, damping, factor) -> None:
    torch.manual_seed(0)
    task = _task(_Net())
    train, test = _data(11, 1), _data(4, 2)
    att = cls(task, damping=damping, damping_factor=factor)
    att.cache(DataLoader(TensorDataset(*_data(15, 3)), batch_size=4))
    scores = att.attribute(
        DataLoader(TensorDataset(*train), batch_size=5),
        DataLoader(TensorDataset(*test), batch_size=3),
    )
    assert scores.shape == (11, 4)
    torch.testing.assert_close(scores, _dense_scores(att, task, train, test), rtol=1e-9, atol=1e-11)
    assert att.args.strategy == ("kfac" if cls is IFAttributorKFAC else "ekfac")
    diag = att.self_attribute(DataLoader(TensorDataset(*train), batch_size=3))
    full = att.attribute(
        DataLoader(TensorDataset(*train), batch_size=11),
        DataLoader(TensorDataset(*train), batch_size=2),
    )
    torch.testing.assert_close(diag, torch.diagonal(full), rtol=1e-10, atol=1e-12)


def test_dattri_call_shape_module_selection_and_memory_pieces() -> None:
    torch.manual_seed(1)
    task = _task(_Net())
    train, test = _data(9, 4), _data(3, 5)
    cache = DataLoader(TensorDataset(*_data(12, 6)), batch_size=12)
    att = IFAttributorEKFAC(task, "fc2", "cpu", 0.05)  # dattri's positional order
    assert att.layer_name == ["fc2.weight", "fc2.bias"] and list(att.modules) == ["fc2"]
    att.cache(cache)
    want = _dense_scores(att, task, train, test)
    torch.testing.assert_close(att.attribute([train], [test]), want, rtol=1e-9, atol=1e-11)
    tiny = IFAttributorEKFAC(
        task, module_name=["fc2"], damping=0.05, memory_budget=1000
    )  # one row per piece
    tiny.cache(cache)
    torch.testing.assert_close(tiny.attribute([train], [test]), want, rtol=1e-9, atol=1e-11)


def test_checkpoints_are_averaged_and_factors_reused(tmp_path, monkeypatch) -> None:
    torch.manual_seed(2)
    model = _Net()
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    sd1 = {k: v + 0.1 * torch.randn_like(v) for k, v in sd0.items()}
    train, test = _data(6, 7), _data(3, 8)
    cache = DataLoader(TensorDataset(*_data(10, 9)), batch_size=5)
    both = IFAttributorEKFAC(
        _task(model, [sd0, sd1]), damping=0.01, factor_dir=tmp_path / "f", num_partitions=2
    )
    both.cache(cache)
    assert (tmp_path / "f" / "checkpoint-1" / "factors.safetensors").is_file()
    got = both.attribute([train], [test])
    parts = []
    for sd in (sd0, sd1):
        single = IFAttributorEKFAC(_task(model, sd), damping=0.01)
        single.cache(cache)
        parts.append(single.attribute([train], [test]))
    torch.testing.assert_close(got, (parts[0] + parts[1]) / 2, rtol=1e-9, atol=1e-11)
    calls = []
    real = kfac_mod.capture_task
    monkeypatch.setattr(kfac_mod, "capture_task", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = IFAttributorEKFAC(
        _task(model, [sd0, sd1]), damping=0.5, factor_dir=tmp_path / "f"
    )  # damping is not in the key
    again.cache(cache)
    assert calls == []
    assert again.operators[1].key == both.operators[1].key


def test_arguments_are_validated() -> None:
    task = _task(_Net())
    for bad in (
        {"damping": -1.0},
        {"strategy": "diag"},
        {"fisher": "exact"},
        {"damping_factor": float("nan")},
        {"num_partitions": 0},
        {"module_name": 3},
        {"memory_budget": "lots"},
    ):
        with pytest.raises(ConfigError):
            IFAttributorEKFAC(task, **bad)
    with pytest.raises(ConfigError, match="valid keys"):
        EKFACArguments.from_dict({"dampin": 0.1})
    assert EKFACArguments.from_dict({"damping": 0.1}).to_dict()["damping"] == 0.1
    att = IFAttributorEKFAC(task)
    with pytest.raises(Exception, match="cache"):
        att.attribute([_data(2, 0)], [_data(2, 1)])


def test_zero_eigenvalues_without_damping_raise() -> None:
    model = nn.Linear(3, 2)
    task = _task(model)
    x = torch.zeros(4, 3)  # constant inputs: A has zero eigenvalues
    att = IFAttributorEKFAC(task)
    att.cache([(x, torch.tensor([0, 1, 0, 1]))])
    with pytest.raises(NonFiniteError, match="damping"):
        att.attribute([(x, torch.tensor([0, 1, 0, 1]))], [(x[:1], torch.tensor([0]))])


def test_transform_test_rep_is_the_damped_inverse_in_layer_name_order() -> None:
    """dattri's ``transform_test_rep``: ``(F + λI)⁻¹ V`` with ``F`` dense, columns in ``layer_name``
    order; scores are ``G_train · transform(G_test)ᵀ`` with torch.func gradients."""
    torch.manual_seed(2)
    task = _task(_Net())
    att = IFAttributorEKFAC(task, damping=0.02, damping_factor=0.05)
    att.cache(DataLoader(TensorDataset(*_data(13, 7)), batch_size=5))
    op, names = att.operators[0], att.layer_name
    assert names == ["c.weight", "c.bias", "fc1.weight", "fc2.weight", "fc2.bias"]
    V = torch.randn(6, att.spec.dim, generator=torch.Generator().manual_seed(3))
    lams = [lf.damping(0.02, 0.05) for lf in op.layers]
    D = torch.diag(
        torch.cat(
            [
                torch.full((lf.shape[0] * lf.shape[1],), x)
                for lf, x in zip(op.layers, lams, strict=True)
            ]
        )
    )
    want = torch.linalg.solve(op.dense() + D, V.T).T  # op.spec order == layer_name order here
    assert list(op.spec.names) == names
    torch.testing.assert_close(att.transform_test_rep(0, V), want, rtol=1e-9, atol=1e-11)
    train, test = _data(7, 8), _data(3, 9)
    g_train = _grads(task, task.loss_func, *train, names)
    g_test = _grads(task, task.target_func, *test, names)
    torch.testing.assert_close(
        att.attribute([train], [test]),
        g_train @ att.transform_test_rep(0, g_test).T,
        rtol=1e-9,
        atol=1e-11,
    )
    with pytest.raises(ConfigError, match="ckpt_idx"):
        att.transform_test_rep(1, V)
    with pytest.raises(ShapeError):
        att.transform_test_rep(0, V[:, :-1])


def test_per_layer_damping_factors_match_the_dense_formula() -> None:
    """``damping_factor={module: f}`` damps each layer by its own ``f · mean(Λ_l)``."""
    torch.manual_seed(4)
    task = _task(_Net())
    factors = {"c": 0.5, "fc1": 2.0, "fc2": 0.05}
    att = IFAttributorEKFAC(task, damping=1e-3, damping_factor=factors)
    att.cache(DataLoader(TensorDataset(*_data(14, 10)), batch_size=5))
    train, test = _data(6, 11), _data(3, 12)
    want = _dense_scores(att, task, train, test)  # uses lf.damping(1e-3, factors) per layer
    lams = [lf.damping(1e-3, factors) for lf in att.operators[0].layers]
    means = [float(lf.eigenvalues().mean()) for lf in att.operators[0].layers]
    assert lams == pytest.approx(
        [1e-3 + f * m for f, m in zip(factors.values(), means, strict=True)]
    )
    torch.testing.assert_close(att.attribute([train], [test]), want, rtol=1e-9, atol=1e-11)
    with pytest.raises(ConfigError, match="selected modules"):
        IFAttributorEKFAC(task, damping_factor={"c": 0.5, "fc1": 2.0})
    with pytest.raises(ConfigError, match="damping_factor"):
        EKFACArguments(damping_factor={"c": -1.0})
