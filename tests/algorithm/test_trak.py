"""TRAK against the closed form computed by hand from autograd gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import TRAKAttributor
from tdabench.errors import ConfigError, NotCachedError
from tdabench.func.projection import make_projector
from tdabench.task import AttributionTask

N_TRAIN, N_TEST, N_IN, N_CLS = 30, 5, 3, 3


def _model(hidden):
    if hidden:
        return nn.Sequential(nn.Linear(N_IN, 4), nn.Tanh(), nn.Linear(4, N_CLS)).double()
    return nn.Sequential(nn.Linear(N_IN, N_CLS)).double()


def _setup(num_ckpt=2, hidden=True, seed=0):
    torch.manual_seed(seed)
    model = _model(hidden)
    g = torch.Generator().manual_seed(seed + 1)
    ckpts = [
        {
            k: v + 0.5 * torch.randn(v.shape, generator=g, dtype=v.dtype)
            for k, v in model.state_dict().items()
        }
        for _ in range(num_ckpt)
    ]
    x = torch.randn(N_TRAIN + N_TEST, N_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_CLS, (N_TRAIN + N_TEST,), generator=g)

    def loss(params, data):
        return F.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    def margin(params, data):
        logits = functional_call(model, params, (data[0],))
        logp = torch.log_softmax(logits, dim=1).gather(1, data[1][:, None]).squeeze(1)
        return (logp - torch.log1p(-torch.exp(logp))).mean()  # log p / (1 - p)

    def prob(params, data):
        logits = functional_call(model, params, (data[0],))
        return torch.softmax(logits, dim=1).gather(1, data[1][:, None]).squeeze(1).mean()

    task = AttributionTask(loss, model, ckpts, target_func=margin)
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    test = TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    return model, ckpts, task, prob, train, test


def _brute(hidden, ckpt, dataset):
    """Per-sample margin gradients and true-class probabilities, one autograd call each."""
    m = _model(hidden)
    m.load_state_dict(ckpt)
    rows, probs = [], []
    for i in range(len(dataset)):
        x, y = dataset[i]
        p = torch.softmax(m(x[None])[0], dim=0)[y]
        (g,) = [
            torch.cat(
                [
                    t.reshape(-1)
                    for t in torch.autograd.grad(torch.log(p / (1 - p)), list(m.parameters()))
                ]
            )
        ]
        rows.append(g)
        probs.append(p.item())
    return torch.stack(rows), torch.tensor(probs, dtype=torch.float64)


def _closed_form(hidden, ckpts, train, test, lam, projections=None):
    kernels, qs = [], []
    for k, c in enumerate(ckpts):
        phi_tr, p_tr = _brute(hidden, c, train)
        phi_te, _ = _brute(hidden, c, test)
        if projections is not None:
            phi_tr, phi_te = phi_tr @ projections[k], phi_te @ projections[k]
        xtx = phi_tr.T @ phi_tr + lam * torch.eye(phi_tr.shape[1], dtype=torch.float64)
        kernels.append((phi_te @ torch.linalg.solve(xtx, phi_tr.T)).T)  # (n_train, n_test)
        qs.append(1 - p_tr)
    return torch.stack(kernels).mean(0) * torch.stack(qs).mean(0)[:, None]


def _loaders(train, test):
    return DataLoader(train, batch_size=7, shuffle=False), DataLoader(
        test, batch_size=2, shuffle=False
    )


def test_identity_projection_closed_form_single_model_no_regularization():
    # first layer only (16 parameters, no softmax shift invariance) < 30 samples: Phi^T Phi invertible
    _model, ckpts, task, prob, train, test = _setup(num_ckpt=1, hidden=True)
    tr, te = _loaders(train, test)
    assert len(tr) >= 3
    att = TRAKAttributor(task, prob, projector_kwargs={"proj_type": "identity"}, layer_name="0")
    att.cache(tr)
    scores = att.attribute(tr, te)
    phi_tr, p_tr = _brute(True, ckpts[0], train)
    phi_te, _ = _brute(True, ckpts[0], test)
    phi_tr, phi_te = phi_tr[:, :16], phi_te[:, :16]  # layer "0" = the first 16 parameters
    direct = (phi_te @ torch.linalg.inv(phi_tr.T @ phi_tr) @ phi_tr.T @ torch.diag(1 - p_tr)).T
    assert scores.shape == (N_TRAIN, N_TEST)
    torch.testing.assert_close(scores, direct, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        att.self_attribute(tr), torch.diagonal(att.attribute(tr, tr)), rtol=1e-10, atol=1e-12
    )


def _pinv_closed_form(ckpt, train, test, projection=None):
    """Scores with the pseudo-inverse of Phi^T Phi, formed from the SVD of Phi (float64)."""
    phi_tr, p_tr = _brute(False, ckpt, train)
    phi_te, _ = _brute(False, ckpt, test)
    if projection is not None:
        phi_tr, phi_te = phi_tr @ projection, phi_te @ projection
    return (phi_te @ torch.linalg.pinv(phi_tr.T @ phi_tr, hermitian=True) @ phi_tr.T).T * (
        1 - p_tr
    )[:, None]


def test_singular_kernel_uses_the_minimum_norm_limit(caplog):
    # a linear softmax model: margin gradients sum to zero over classes, so Phi^T Phi is singular
    _, ckpts, task, prob, train, test = _setup(num_ckpt=1, hidden=False)
    tr, te = _loaders(train, test)
    att = TRAKAttributor(task, prob, projector_kwargs={"proj_type": "identity"})
    with caplog.at_level("WARNING", logger="tdabench.algorithm.trak"):
        att.cache(tr)
    assert "singular" in caplog.text and "regularization > 0" in caplog.text
    assert "rank 8" in caplog.text  # 12 parameters, 4 of them the softmax shift directions
    scores = att.attribute(tr, te)
    torch.testing.assert_close(
        scores, _pinv_closed_form(ckpts[0], train, test), rtol=1e-8, atol=1e-10
    )
    torch.testing.assert_close(
        att.self_attribute(tr), torch.diagonal(att.attribute(tr, tr)), rtol=1e-9, atol=1e-11
    )
    # the limit regularization -> 0+ of the regularized closed form (error O(lambda))
    errors = [
        float((_closed_form(False, ckpts, train, test, lam) - scores).abs().max())
        for lam in (1e-4, 1e-6)
    ]
    assert errors[1] < 1e-7 and errors[1] < errors[0] / 50
    # a ridge below the kernel's float64 precision is refused, a real one is used as given
    with pytest.raises(ConfigError, match="below the kernel's precision"):
        TRAKAttributor(
            task, prob, projector_kwargs={"proj_type": "identity"}, regularization=1e-300
        ).cache(tr)
    ridge = TRAKAttributor(
        task, prob, projector_kwargs={"proj_type": "identity"}, regularization=1e-3
    )
    ridge.cache(tr)
    torch.testing.assert_close(
        ridge.attribute(tr, te),
        _closed_form(False, ckpts, train, test, 1e-3),
        rtol=1e-8,
        atol=1e-10,
    )


def test_more_projected_dimensions_than_samples_is_the_pseudo_inverse(caplog):
    _, ckpts, task, prob, train, test = _setup(num_ckpt=1, hidden=False)
    tr, te = _loaders(train, test)
    att = TRAKAttributor(task, prob, projector_kwargs={"proj_dim": 64, "seed": 3})
    with caplog.at_level("WARNING", logger="tdabench.algorithm.trak"):
        att.cache(tr)
    assert "64 projected dimensions" in caplog.text
    projection = make_projector(12, 64, seed=3, dtype=torch.float64).matrix()
    expected = _pinv_closed_form(ckpts[0], train, test, projection)
    torch.testing.assert_close(att.attribute(tr, te), expected, rtol=1e-7, atol=1e-9)


def test_regular_kernel_is_the_plain_solve_without_warning(caplog):
    _model, ckpts, task, prob, train, test = _setup(num_ckpt=1, hidden=True)
    tr, te = _loaders(train, test)
    att = TRAKAttributor(task, prob, projector_kwargs={"proj_dim": 8, "seed": 5})
    with caplog.at_level("WARNING", logger="tdabench.algorithm.trak"):
        att.cache(tr)
    assert "singular" not in caplog.text
    projection = make_projector(31, 8, seed=5, dtype=torch.float64).matrix()
    expected = _closed_form(True, ckpts, train, test, 0.0, [projection])
    torch.testing.assert_close(att.attribute(tr, te), expected, rtol=1e-8, atol=1e-10)


def test_ensemble_average_identity_projection_with_regularization():
    _model, ckpts, task, prob, train, test = _setup(num_ckpt=3, hidden=True)
    tr, te = _loaders(train, test)
    att = TRAKAttributor(task, prob, projector_kwargs={"proj_type": "identity"}, regularization=0.1)
    att.cache(tr)
    expected = _closed_form(True, ckpts, train, test, 0.1)
    torch.testing.assert_close(att.attribute(tr, te), expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(
        att.self_attribute(tr), torch.diagonal(att.attribute(tr, tr)), rtol=1e-10, atol=1e-12
    )
    # a train subset scored against the full-set cache equals the matching rows
    sub = DataLoader(torch.utils.data.Subset(train, range(10, 20)), batch_size=4)
    torch.testing.assert_close(att.attribute(sub, te), expected[10:20], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("proj_type", ["gaussian", "sparse"])
def test_random_projection_uses_seed_plus_checkpoint(proj_type):
    model, ckpts, task, prob, train, test = _setup(num_ckpt=2, hidden=True)
    tr, te = _loaders(train, test)
    d = sum(p.numel() for p in model.parameters())
    kw = (
        {"proj_dim": 8, "seed": 11}
        if proj_type == "gaussian"
        else {"proj_dim": 8, "seed": 11, "proj_type": proj_type}
    )
    # a CountSketch of 31 parameters into 8 buckets may leave a bucket empty (a zero feature
    # column): a small ridge keeps the kernel invertible
    lam = 0.0 if proj_type == "gaussian" else 1e-3
    att = TRAKAttributor(task, prob, projector_kwargs=kw, regularization=lam)
    att.cache(tr)
    projections = [
        make_projector(d, 8, seed=11 + k, proj_type=proj_type, dtype=torch.float64).matrix()
        for k in range(2)
    ]
    expected = _closed_form(True, ckpts, train, test, lam, projections)
    torch.testing.assert_close(att.attribute(tr, te), expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        att.self_attribute(tr), torch.diagonal(att.attribute(tr, tr)), rtol=1e-10, atol=1e-12
    )
    assert att.hyperparameters()["projector_kwargs"]["proj_type"] == proj_type


def test_bad_input():
    model, _ckpts, task, prob, train, test = _setup(num_ckpt=1, hidden=True)
    tr, te = _loaders(train, test)
    att = TRAKAttributor(task, prob, projector_kwargs={"proj_dim": 4})
    with pytest.raises(NotCachedError):
        att.attribute(tr, te)
    with pytest.raises(NotCachedError):
        att.self_attribute(tr)
    with pytest.raises(ConfigError, match="unknown projector_kwargs"):
        TRAKAttributor(task, prob, projector_kwargs={"proj_dim": 4, "proj_batch": 8})
    with pytest.raises(ConfigError, match="regularization"):
        TRAKAttributor(task, prob, regularization=-1.0)
    with pytest.raises(ConfigError, match="callable"):
        TRAKAttributor(task, "prob")

    def logit_not_prob(params, data):
        logits = functional_call(model, params, (data[0],))
        return 5.0 + logits.gather(1, data[1][:, None]).mean()

    bad = TRAKAttributor(task, logit_not_prob, projector_kwargs={"proj_dim": 4})
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):  # caught while caching the train side
        bad.cache(tr)


def test_float32_model_agrees_with_float64_and_settings_do_not_leak():
    _, ckpts, task64, prob64, train, test = _setup(num_ckpt=2, hidden=True)
    torch.manual_seed(0)
    model32 = _model(True).float()

    def margin32(params, data):
        logp = torch.log_softmax(functional_call(model32, params, (data[0],)), 1).gather(
            1, data[1][:, None]
        )
        return (logp - torch.log1p(-torch.exp(logp))).mean()

    def prob32(params, data):
        logits = functional_call(model32, params, (data[0],))
        return torch.softmax(logits, 1).gather(1, data[1][:, None]).mean()

    ckpts32 = [{k: v.float() for k, v in c.items()} for c in ckpts]
    task32 = AttributionTask(margin32, model32, ckpts32, target_func=margin32)
    kw = {"proj_dim": 6, "seed": 2}
    a64 = TRAKAttributor(task64, prob64, projector_kwargs=kw)
    a32 = TRAKAttributor(task32, prob32, projector_kwargs=kw)
    tr, te = _loaders(train, test)
    a64.cache(tr)
    tr32 = DataLoader(TensorDataset(train.tensors[0].float(), train.tensors[1]), batch_size=7)
    te32 = DataLoader(TensorDataset(test.tensors[0].float(), test.tensors[1]), batch_size=2)
    a32.cache(tr32)
    s64, s32 = a64.attribute(tr, te), a32.attribute(tr32, te32)
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32.double(), s64, rtol=1e-3, atol=1e-3 * float(s64.abs().max()))
    # per-instance projector settings: a later attributor gets the defaults, not kw
    assert TRAKAttributor(task64, prob64).projector_kwargs["proj_dim"] == 512
    assert kw == {"proj_dim": 6, "seed": 2}


@pytest.mark.gpu
def test_cuda_matches_cpu_identity_projection():
    _, _ckpts, task, prob, train, test = _setup(num_ckpt=2, hidden=True)
    tr, te = _loaders(train, test)
    kw = {"proj_type": "identity"}
    cpu = TRAKAttributor(task, prob, projector_kwargs=kw, regularization=0.1)
    gpu = TRAKAttributor(task, prob, projector_kwargs=kw, regularization=0.1, device="cuda")
    cpu.cache(tr)
    gpu.cache(tr)
    torch.testing.assert_close(
        gpu.attribute(tr, te).cpu(), cpu.attribute(tr, te), rtol=1e-8, atol=1e-10
    )
    torch.testing.assert_close(
        gpu.self_attribute(tr).cpu(), cpu.self_attribute(tr), rtol=1e-8, atol=1e-10
    )


def test_cached_train_features_are_reused_only_for_the_same_data():
    from torch.utils.data import DataLoader

    _, _ckpts, task, prob, train_ds, test_ds = _setup(num_ckpt=2, hidden=True)
    train = DataLoader(train_ds, batch_size=7)
    test = DataLoader(test_ds, batch_size=5)
    att = TRAKAttributor(task, prob, projector_kwargs={"proj_dim": 4})
    att.cache(train)
    calls = []
    orig = att._train_terms
    att._train_terms = lambda *a, **k: calls.append(1) or orig(*a, **k)
    first = att.attribute(train, test)
    assert not calls  # same content as the cache loader: no recomputation
    fresh = TRAKAttributor(task, prob, projector_kwargs={"proj_dim": 4})
    fresh.cache(train)
    fresh._train_features = None  # force recomputation
    torch.testing.assert_close(first, fresh.attribute(train, test))
    torch.testing.assert_close(att.self_attribute(train), fresh.self_attribute(train))
    # a different train loader is recomputed, not served from the cache
    part = DataLoader(torch.utils.data.Subset(train_ds, range(7)), batch_size=7)
    torch.testing.assert_close(att.attribute(part, test), first[:7])
    assert calls


def test_dattri_call_forms_give_the_same_scores():
    """dattri's attribute(test) after cache() and its keywords equal attribute(train, test);
    dattri's positional (test, train) order is refused, naming the difference."""
    _, _, task, prob, train, test = _setup()
    trak = TRAKAttributor(task, prob, projector_kwargs={"proj_dim": 8, "proj_type": "gaussian"})
    train_loader, test_loader = DataLoader(train, batch_size=7), DataLoader(test, batch_size=2)
    with pytest.raises(NotCachedError):
        trak.attribute(test_loader)
    with pytest.raises(NotCachedError, match=r"dattri's\s+positional order"):
        trak.attribute(train_loader, test_loader)
    # the same samples in both roles (other batching): unambiguous, cached on demand
    same = TRAKAttributor(task, prob, projector_kwargs={"proj_dim": 8, "proj_type": "gaussian"})
    both = same.attribute(train_loader, DataLoader(train, batch_size=3))
    assert both.shape == (N_TRAIN, N_TRAIN)
    fresh = TRAKAttributor(task, prob, projector_kwargs={"proj_dim": 8, "proj_type": "gaussian"})
    on_demand = fresh.attribute(test_dataloader=test_loader, train_dataloader=train_loader)
    trak.cache(train_loader)
    ours = trak.attribute(train_loader, test_loader)
    assert ours.shape == (N_TRAIN, N_TEST)
    torch.testing.assert_close(trak.attribute(test_loader), ours, rtol=0, atol=0)
    kw = trak.attribute(test_dataloader=test_loader, train_dataloader=train_loader)
    torch.testing.assert_close(kw, ours, rtol=0, atol=0)
    torch.testing.assert_close(trak.attribute(test_dataloader=test_loader), ours, rtol=0, atol=0)
    torch.testing.assert_close(on_demand, ours, rtol=0, atol=0)
    torch.testing.assert_close(both, trak.attribute(train_loader, train_loader), rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"dattri's positional order is \(test, train\)"):
        trak.attribute(test_loader, train_loader)
