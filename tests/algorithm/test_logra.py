"""LoGra oracles: full-rank (identity) projections give the exact per-layer gradient inner
products and the dense damped-Fisher formula; random Kronecker projections equal the dense
``(P_out ⊗ P_in)ᵀ vec(G)`` of autograd gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import LoGraAttributor
from tdabench.errors import ConfigError, MemoryLimitError
from tdabench.task import AttributionTask


@pytest.fixture(autouse=True)
def _float64_default():
    """float64 by default inside this module's tests only (restored after each test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Net(nn.Module):
    def __init__(self, conv: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2) if conv else None
        self.fc1 = nn.Linear(8 if conv else 3, 4)
        self.fc2 = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        if self.conv is not None:
            x = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(x)))


def _problem(conv: bool = False, seed: int = 0, n: int = 9):
    g = torch.Generator().manual_seed(seed)
    model = Net(conv).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(n, 1, 3, 3, generator=g) if conv else torch.randn(n, 3, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)

    def loss(params, data):
        return nn.functional.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    def target(params, data):
        logits = functional_call(model, params, (data[0],))
        return -logits.gather(1, data[1][:, None]).mean() + 0.1 * logits.pow(2).mean()

    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return model, AttributionTask(loss, model, sd, target_func=target), x, y


def _layer_grads(model, fn, x, y):
    """{module: (n, d_out, d_in')} per-sample gradients of [W | b] by autograd, one sample at a time."""
    params = dict(model.named_parameters())
    out: dict[str, list] = {}
    for i in range(x.shape[0]):
        gs = dict(
            zip(
                params,
                torch.autograd.grad(
                    fn(params, (x[i : i + 1], y[i : i + 1])), list(params.values())
                ),
                strict=True,
            )
        )
        for mod in ("conv", "fc1", "fc2"):
            if f"{mod}.weight" not in gs:
                continue
            w = gs[f"{mod}.weight"].reshape(gs[f"{mod}.weight"].shape[0], -1)
            if f"{mod}.bias" in gs:
                w = torch.cat([w, gs[f"{mod}.bias"][:, None]], dim=1)
            out.setdefault(mod, []).append(w)
    return {k: torch.stack(v) for k, v in out.items()}


def _dense_scores(Gtr, Gte, damping, hessian="eFIM"):
    """Σ_l t_lᵀ (F_l + λ_l I)^{-1} g_l with F_l = mean of p pᵀ over the training rows, λ_l relative."""
    total = 0
    for mod in Gtr:
        P, T = Gtr[mod].flatten(1), Gte[mod].flatten(1)
        if hessian == "Identity":
            total = total + P @ T.T
            continue
        F = P.T @ P / P.shape[0]
        F = F + damping * torch.trace(F) / F.shape[0] * torch.eye(F.shape[0])
        total = total + P @ torch.linalg.solve(F, T.T)
    return total


def _loaders(x, y, bs=4):
    return DataLoader(TensorDataset(x, y), batch_size=bs), DataLoader(
        TensorDataset(x[:5], y[:5]), batch_size=2
    )


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("hessian", ["eFIM", "Identity"])
def test_full_rank_logra_equals_exact_per_layer_formula(conv, hessian):
    model, task, x, y = _problem(conv)
    train, test = _loaders(x, y)
    # sqrt(proj_dim) = 16 >= every factor dimension: both factors are the identity
    att = LoGraAttributor(task, hessian=hessian, damping=0.01, proj_dim=256)
    att.cache(train)
    scores = att.attribute(train, test)
    Gtr = _layer_grads(model, task.loss_func, x, y)
    Gte = _layer_grads(model, task.target_func, x[:5], y[:5])
    assert att.layer_dims == [Gtr[m][0].numel() for m in att.layer_names]
    expected = _dense_scores(Gtr, Gte, 0.01, hessian)
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-10)
    if hessian == "Identity":  # = the inner product of the whole per-sample gradients
        full = (
            torch.cat([Gtr[m].flatten(1) for m in Gtr], 1)
            @ torch.cat([Gte[m].flatten(1) for m in Gte], 1).T
        )
        torch.testing.assert_close(scores, full, rtol=1e-10, atol=1e-12)
    # the same loader object reuses the kept projections; a new loader object recomputes them
    other = DataLoader(TensorDataset(x, y), batch_size=2)
    torch.testing.assert_close(att.attribute(other, test), scores, rtol=1e-10, atol=1e-12)
    # a loader over the same dataset object, unshuffled, other batch size: the kept projections are reused
    calls = []
    orig = att.projected
    att.projected = lambda b, which="loss", index=0: calls.append(which) or orig(b, which, index)
    torch.testing.assert_close(
        att.attribute(DataLoader(train.dataset, batch_size=5), test), scores, rtol=1e-10, atol=1e-12
    )
    assert calls == ["target"] * 3
    att.projected = orig
    Gself = _layer_grads(model, task.target_func, x, y)
    torch.testing.assert_close(
        att.self_attribute(train),
        torch.diagonal(_dense_scores(Gtr, Gself, 0.01, hessian)),
        rtol=1e-8,
        atol=1e-10,
    )


def test_memory_budget_too_small_to_keep_projections():
    _, task, x, y = _problem(n=40)
    train, test = _loaders(x, y)
    ref = LoGraAttributor(task, damping=0.01, proj_dim=256)
    ref.cache(train)
    # 2 x the Fisher matrices (16² + 12² float64) fit; half the budget cannot hold 40 x 28 projections
    small = LoGraAttributor(
        task, damping=0.01, proj_dim=256, memory_budget=2 * 8 * (16**2 + 12**2) + 8
    )
    small.cache(train)
    assert ref._stores[0].complete and not small._stores[0].complete
    torch.testing.assert_close(
        small.attribute(train, test), ref.attribute(train, test), rtol=1e-10, atol=1e-12
    )
    with pytest.raises(MemoryLimitError, match="projected Fisher"):
        LoGraAttributor(task, proj_dim=256, memory_budget=1000).cache(train)


def test_kronecker_projection_equals_dense_projection():
    model, task, x, y = _problem()
    train, test = _loaders(x, y)
    att = LoGraAttributor(task, proj_dim=4, damping=0.1, seed=3)  # 2 x 2 factors
    att.cache(train)
    Gtr = _layer_grads(model, task.loss_func, x, y)
    Gte = _layer_grads(model, task.target_func, x[:5], y[:5])
    ptr, pte = {}, {}
    for comp, mod in zip(att.compressors, att.layer_names, strict=True):
        assert comp.p_out is not None and comp.p_in is not None  # fc1 4 x 4, fc2 3 x 4: projected
        K = torch.kron(comp.p_out, comp.p_in)  # vec_row(P_outᵀ G P_in) = (P_out ⊗ P_in)ᵀ vec_row(G)
        ptr[mod], pte[mod] = Gtr[mod].flatten(1) @ K, Gte[mod].flatten(1) @ K
    proj = torch.cat([att.projected((x, y), "loss", 0)])
    torch.testing.assert_close(
        proj, torch.cat([ptr[m] for m in att.layer_names], 1), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        att.attribute(train, test), _dense_scores(ptr, pte, 0.1), rtol=1e-8, atol=1e-10
    )
    # another seed draws other factors
    other = LoGraAttributor(task, proj_dim=4, damping=0.1, seed=4)
    other.cache(train)
    assert not torch.allclose(other.compressors[0].p_in, att.compressors[0].p_in)


def test_dattri_style_loss_disk_offload_and_implicit_cache(tmp_path):
    model, task, x, y = _problem()
    train, test = _loaders(x, y)
    ref = LoGraAttributor(task, proj_dim=4, damping=0.1)
    ref.cache(train)
    expected = ref.attribute(train, test)

    def f(m, batch, device):  # dattri's LoGra loss form
        return nn.functional.cross_entropy(m(batch[0].to(device)), batch[1].to(device))

    task2 = AttributionTask(f, model, {k: v.clone() for k, v in model.state_dict().items()})
    att = LoGraAttributor(
        task2, proj_dim=4, damping=0.1, offload="disk", cache_dir=str(tmp_path), chunk_size=1
    )
    scores = att.attribute(train, test)  # caches the train loader first, as dattri does
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3  # 9 samples in batches of 4 -> 3 shards
    # target = loss for task2, so compare with the loss-loss scores of the reference
    task_ll = AttributionTask(
        task.loss_func, model, {k: v.clone() for k, v in model.state_dict().items()}
    )
    ref_ll = LoGraAttributor(task_ll, proj_dim=4, damping=0.1)
    ref_ll.cache(train)
    torch.testing.assert_close(scores, ref_ll.attribute(train, test), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        att.compute_self_attribution(), ref_ll.self_attribute(train), rtol=1e-10, atol=1e-12
    )
    assert not torch.allclose(expected, scores)  # the reference used a different target


def test_logra_arguments():
    _, task, _, _ = _problem()
    with pytest.raises(ConfigError, match="perfect square"):
        LoGraAttributor(task, proj_dim=50)
    with pytest.raises(ConfigError, match="hessian"):
        LoGraAttributor(task, hessian="raw")
    with pytest.raises(ConfigError, match="cache_dir"):
        LoGraAttributor(task, offload="disk")
    with pytest.raises(ConfigError, match="damping"):
        LoGraAttributor(task, damping=-1.0)
    with pytest.raises(ConfigError, match="not found"):
        LoGraAttributor(task, layer_names=["nope"])
    att = LoGraAttributor(task, layer_names="fc2", proj_dim=16)
    assert att.layer_names == ["fc2"] and att.spec.names == ("fc2.weight",)
    assert att.hyperparameters()["proj_dim"] == 16
    from tdabench.algorithm.arguments import arguments_for

    assert (
        arguments_for("LoGraAttributor")
        .from_dict({"proj_dim": 64, "damping": 0.1})
        .result_dict()["proj_dim"]
        == 64
    )
    with pytest.raises(ConfigError, match="perfect square"):
        arguments_for("LoGraAttributor").from_dict({"proj_dim": 50})
