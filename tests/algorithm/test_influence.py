"""Oracle tests of the influence-function attributors (float64, tiny problems).

Oracles, all independent of the library's HVP / solver code paths:
* actual leave-one-out retraining (Newton to machine precision) of an L2-regularised
  multinomial logistic regression;
* a dense Hessian from ``torch.autograd.functional.hessian`` of the batch-mean loss, per-sample
  gradients from a Python loop of ``torch.autograd.grad``, and ``numpy.linalg.solve`` /
  ``numpy.linalg.eigh``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from tdabench.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MemoryLimitError,
    NonFiniteError,
    NotCachedError,
)
from tdabench.func import solvers
from tdabench.task import AttributionTask

DT = torch.float64
N_TRAIN, N_TEST, D_IN, N_CLS = 80, 8, 5, 3
L2 = 0.05


# ---------------------------------------------------------------------------- problems
def _make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N_CLS, D_IN, generator=g, dtype=DT) * 1.5
    X = torch.randn(N_TRAIN + N_TEST, D_IN, generator=g, dtype=DT)
    logits = X @ W.T + 0.7 * torch.randn(N_TRAIN + N_TEST, N_CLS, generator=g, dtype=DT)
    y = logits.argmax(1)
    # flip a few labels so that some training points are harmful
    flip = torch.randperm(N_TRAIN, generator=g)[:8]
    y[flip] = (y[flip] + 1) % N_CLS
    return (X[:N_TRAIN], y[:N_TRAIN]), (X[N_TRAIN:], y[N_TRAIN:])


def _lr_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(D_IN, N_CLS).to(DT)


def _flat_to_params(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"weight": theta[: N_CLS * D_IN].view(N_CLS, D_IN), "bias": theta[N_CLS * D_IN :]}


def _ce_vec(theta, X, y):
    p = _flat_to_params(theta)
    return F.cross_entropy(X @ p["weight"].T + p["bias"], y, reduction="none")


def _newton(theta0, X, y, weights, denom, lam, tol=1e-13, max_iter=60):
    """Minimise (1/denom) Σ w_i CE_i + lam/2 ||θ||² by Newton's method with the closed-form
    multinomial-LR gradient and Hessian (numpy, float64), in the augmented [W | b] layout."""
    Xa = np.concatenate([X.numpy(), np.ones((X.shape[0], 1))], axis=1)  # (n, D+1)
    Y = np.eye(N_CLS)[y.numpy()]
    w = weights.numpy() / denom
    t = theta0.numpy()
    Wa = np.concatenate([t[: N_CLS * D_IN].reshape(N_CLS, D_IN), t[N_CLS * D_IN :, None]], axis=1)
    for _ in range(max_iter):
        Z = Xa @ Wa.T
        P = np.exp(Z - Z.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        G = (w[:, None] * (P - Y)).T @ Xa + lam * Wa  # (C, D+1)
        if np.linalg.norm(G) < tol:
            theta = np.concatenate([Wa[:, :D_IN].reshape(-1), Wa[:, D_IN]])
            return torch.from_numpy(theta)
        A = P[:, :, None] * np.eye(N_CLS)[None] - P[:, :, None] * P[:, None, :]  # (n, C, C)
        H = np.einsum("i,iab,ij,ik->ajbk", w, A, Xa, Xa).reshape(G.size, G.size) + lam * np.eye(
            G.size
        )
        Wa = Wa - np.linalg.solve(H, G.reshape(-1)).reshape(Wa.shape)
    raise AssertionError(f"Newton did not converge: |g| = {np.linalg.norm(G)}")


@pytest.fixture(scope="module")
def lr_problem():
    """Converged L2-regularised multinomial LR + loaders helpers."""
    (Xtr, ytr), (Xte, yte) = _make_data()
    theta0 = torch.zeros(N_CLS * D_IN + N_CLS, dtype=DT)
    theta = _newton(theta0, Xtr, ytr, torch.ones(N_TRAIN, dtype=DT), N_TRAIN, L2)
    state = {k: v.clone() for k, v in _flat_to_params(theta).items()}
    return dict(Xtr=Xtr, ytr=ytr, Xte=Xte, yte=yte, theta=theta, state=state)


def _ce_loss(model):
    def loss_func(params, data):
        x, y = data
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss_func


def _ce_l2_loss(model, lam):
    def loss_func(params, data):
        x, y = data
        reg = sum((p * p).sum() for p in params.values())
        return F.cross_entropy(functional_call(model, params, (x,)), y) + 0.5 * lam * reg

    return loss_func


def _margin_target(model):
    def target(params, data):
        x, y = data
        logits = functional_call(model, params, (x,))
        true = logits.gather(1, y[:, None])[:, 0]
        others = logits.masked_fill(torch.arange(logits.shape[1]) == y[:, None], float("-inf"))
        return -(true - torch.logsumexp(others, dim=1)).mean()  # a loss-like target: lower = better

    return target


def _loader(X, y, batch_size):
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=False)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, 6)
        self.fc2 = nn.Linear(6, N_CLS)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _mlp_model() -> nn.Module:
    torch.manual_seed(1)
    return MLP().to(DT)


# ---------------------------------------------------------------------------- oracle
def _oracle(model, state, loss_func, target_func, train, test, reg, names=None):
    """Dense IF scores with autograd.functional.hessian of the batch-mean loss over
    ``train``, per-sample gradients by a Python loop, a numpy solve. ``names`` restricts the
    parameters (the Hessian is then the sub-block of the full one)."""
    all_names = [n for n, _ in model.named_parameters()]
    shapes = [state[n].shape for n in all_names]
    sizes = [int(math.prod(s)) for s in shapes]
    theta = torch.cat([state[n].reshape(-1) for n in all_names])

    def unflat(t):
        out, o = {}, 0
        for n, s, k in zip(all_names, shapes, sizes, strict=True):
            out[n] = t[o : o + k].view(s)
            o += k
        return out

    X, y = train
    H = torch.autograd.functional.hessian(lambda t: loss_func(unflat(t), (X, y)), theta)

    def grads(func, data):
        rows = []
        for i in range(data[0].shape[0]):
            t = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(func(unflat(t), (data[0][i : i + 1], data[1][i : i + 1])), t)
            rows.append(g)
        return torch.stack(rows)

    Gtr, Gte = grads(loss_func, train), grads(target_func, test)
    if names is not None:
        idx, o = [], 0
        for n, k in zip(all_names, sizes, strict=True):
            if n in names:
                idx.extend(range(o, o + k))
            o += k
        idx = torch.tensor(idx)
        H, Gtr, Gte = H[idx][:, idx], Gtr[:, idx], Gte[:, idx]
    A = H.numpy() + reg * np.eye(H.shape[0])
    X_te = np.linalg.solve(A, Gte.numpy().T)  # (d, m)
    return Gtr.numpy() @ X_te, H.numpy()


@pytest.fixture(scope="module")
def lr_oracle(lr_problem):
    p = lr_problem
    model = _lr_model()
    scores, H = _oracle(
        model,
        p["state"],
        _ce_loss(model),
        _ce_loss(model),
        (p["Xtr"], p["ytr"]),
        (p["Xte"], p["yte"]),
        L2,
    )
    return scores, H + L2 * np.eye(H.shape[0])


@pytest.fixture(scope="module")
def lr_oracle_l2loss(lr_problem):
    """Oracle when the penalty is inside loss_func: H of mean(CE + R), train gradients of CE + R
    (so each test column shifts by g_testᵀ(H + λI)⁻¹λθ), test gradients of CE."""
    p = lr_problem
    model = _lr_model()
    scores, _ = _oracle(
        model,
        p["state"],
        _ce_l2_loss(model, L2),
        _ce_loss(model),
        (p["Xtr"], p["ytr"]),
        (p["Xte"], p["yte"]),
        0.0,
    )
    return scores


def _lr_task(p, l2_in_loss=False, target=None, checkpoints=None):
    """LR task; with ``l2_in_loss`` the penalty is part of every sample's loss and the target
    is the plain test cross-entropy."""
    model = _lr_model()
    loss = _ce_l2_loss(model, L2) if l2_in_loss else _ce_loss(model)
    if target is None and l2_in_loss:
        target = _ce_loss
    return AttributionTask(
        loss,
        model,
        checkpoints if checkpoints is not None else p["state"],
        target_func=target(model) if target else None,
    )


def _np(t):
    return t.detach().cpu().numpy()


# ---------------------------------------------------------------------------- 1. LOO oracle
LOO_REMOVED = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(3))[:20].tolist()
EPS = 1e-3


@pytest.fixture(scope="module")
def loo_truth(lr_problem):
    """Actual retraining (Newton to |grad| < 1e-13) for 20 removed indices: test-loss changes
    for (a) natural LOO (mean over the n-1 others), (b) removal of sample i's weight from the
    (1/n)-sum, (c) down-weighting sample i by EPS, divided by EPS (the IF's exact target)."""
    p = lr_problem
    base = _np(_ce_vec(p["theta"], p["Xte"], p["yte"]))
    out = {"mean": [], "fixed": [], "eps": [], "eps_l2loss": []}
    for i in LOO_REMOVED:
        for key, wi, denom, scale, lam in (
            ("mean", 0.0, N_TRAIN - 1, 1.0, L2),
            ("fixed", 0.0, N_TRAIN, 1.0, L2),
            ("eps", 1.0 - EPS, N_TRAIN, 1.0 / EPS, L2),
            # penalty inside each sample's loss: down-weighting i also down-weights its share of R
            ("eps_l2loss", 1.0 - EPS, N_TRAIN, 1.0 / EPS, L2 * (N_TRAIN - EPS) / N_TRAIN),
        ):
            w = torch.ones(N_TRAIN, dtype=DT)
            w[i] = wi
            th = _newton(p["theta"], p["Xtr"], p["ytr"], w, denom, lam)
            out[key].append((_np(_ce_vec(th, p["Xte"], p["yte"])) - base) * scale)
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("l2_in_loss", [False, True], ids=["regularization-arg", "l2-in-loss"])
def test_explicit_matches_actual_leave_one_out(lr_problem, loo_truth, l2_in_loss):
    p = lr_problem
    task = _lr_task(p, l2_in_loss=l2_in_loss)
    att = IFAttributorExplicit(task, regularization=0.0 if l2_in_loss else L2)
    att.cache(_loader(p["Xtr"], p["ytr"], 16))
    scores = _np(att.attribute(_loader(p["Xtr"], p["ytr"], 16), _loader(p["Xte"], p["yte"], 4)))
    assert scores.shape == (N_TRAIN, N_TEST)
    pred = scores[LOO_REMOVED] / N_TRAIN

    # natural LOO retraining: per-test Pearson over the 20 removed samples
    corrs = [np.corrcoef(pred[:, j], loo_truth["mean"][:, j])[0, 1] for j in range(N_TEST)]
    assert min(corrs) >= 0.9, corrs
    assert np.mean(corrs) >= 0.99, corrs
    # sign and size: removing a helpful point (positive score) raises the test loss by ~score/n
    # (full removal is a finite step, so only roughly: measured slope 1.12)
    if not l2_in_loss:
        fixed = loo_truth["fixed"]
        assert np.corrcoef(pred.ravel(), fixed.ravel())[0, 1] >= 0.99
        slope = float((pred * fixed).sum() / (pred * pred).sum())
        assert 0.95 < slope < 1.3, slope
    # the infinitesimal version is exact: d(test loss)/d(-weight_i) = score / n
    eps = loo_truth["eps_l2loss" if l2_in_loss else "eps"]
    np.testing.assert_allclose(pred, eps, atol=2e-3 * np.abs(eps).max())


def test_explicit_matches_dense_oracle_for_both_l2_routes(lr_problem, lr_oracle, lr_oracle_l2loss):
    p = lr_problem
    out = []
    for l2_in_loss in (False, True):
        att = IFAttributorExplicit(
            _lr_task(p, l2_in_loss), regularization=0.0 if l2_in_loss else L2
        )
        att.cache(_loader(p["Xtr"], p["ytr"], 80))
        out.append(
            _np(att.attribute(_loader(p["Xtr"], p["ytr"], 32), _loader(p["Xte"], p["yte"], 8)))
        )
    np.testing.assert_allclose(out[0], lr_oracle[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(out[1], lr_oracle_l2loss, rtol=1e-9, atol=1e-11)
    # the two routes differ by one constant per test column (the penalty's gradient λθ)
    diff = out[1] - out[0]
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:1], diff.shape), atol=1e-10)


# ---------------------------------------------------------------------------- 2. iterative methods
def _scores(att, p, cache_bs=16, train_bs=16, test_bs=4):
    att.cache(_loader(p["Xtr"], p["ytr"], cache_bs))
    return _np(
        att.attribute(_loader(p["Xtr"], p["ytr"], train_bs), _loader(p["Xte"], p["yte"], test_bs))
    )


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_cg_matches_oracle(lr_problem, lr_oracle, mode):
    att = IFAttributorCG(_lr_task(lr_problem), max_iter=50, tol=1e-12, mode=mode, regularization=L2)
    np.testing.assert_allclose(
        _scores(att, lr_problem, cache_bs=13), lr_oracle[0], rtol=1e-7, atol=1e-9
    )


def test_lissa_deterministic_full_batch_matches_oracle(lr_problem, lr_oracle, lr_oracle_l2loss):
    evals = np.linalg.eigvalsh(lr_oracle[1])
    scaling = float(evals.max())  # > λ_max / 2: converges; contraction 1 - λ_min / scaling
    depth = math.ceil(math.log(1e-9) / math.log(1 - evals.min() / scaling))
    assert depth < 600, depth
    att = IFAttributorLiSSA(
        _lr_task(lr_problem, l2_in_loss=True),
        batch_size=N_TRAIN,
        recursion_depth=depth,
        scaling=scaling,
        damping=0.0,
    )
    ref = lr_oracle_l2loss
    np.testing.assert_allclose(
        _scores(att, lr_problem), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max()
    )


def test_lissa_damping_acts_as_regularization(lr_problem, lr_oracle):
    """Fixed point (H + damping·scaling·I)^{-1}: L2 via damping instead of the loss."""
    evals = np.linalg.eigvalsh(lr_oracle[1])
    scaling = float(evals.max())
    att = IFAttributorLiSSA(
        _lr_task(lr_problem, l2_in_loss=False),
        batch_size=N_TRAIN,
        recursion_depth=110,
        scaling=scaling,
        damping=L2 / scaling,
        mode="rev-fwd",
    )
    np.testing.assert_allclose(
        _scores(att, lr_problem), lr_oracle[0], rtol=1e-5, atol=1e-5 * np.abs(lr_oracle[0]).max()
    )


def test_lissa_stochastic_close_and_seeded(lr_problem, lr_oracle, lr_oracle_l2loss):
    evals = np.linalg.eigvalsh(lr_oracle[1])
    p = lr_problem
    # contraction 1 - λ_min / scaling ≈ 0.94: 80 steps leave a bias below 1 %; the rest is noise
    kw = dict(batch_size=40, num_repeat=2, recursion_depth=80, scaling=2.0 * float(evals.max()))
    s1 = _scores(IFAttributorLiSSA(_lr_task(p, l2_in_loss=True), seed=1, **kw), p)
    ref = lr_oracle_l2loss
    rel = np.linalg.norm(s1 - ref) / np.linalg.norm(ref)
    assert rel < 0.25, rel  # measured ~0.1
    assert np.corrcoef(s1.ravel(), ref.ravel())[0, 1] > 0.97
    # seeded: the same seed repeats, another seed differs
    kw.update(recursion_depth=5, num_repeat=1)
    a, b, c = (
        _scores(IFAttributorLiSSA(_lr_task(p, l2_in_loss=True), seed=sd, **kw), p)
        for sd in (3, 3, 4)
    )
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-6


def test_arnoldi_full_rank_matches_oracle(lr_problem, lr_oracle):
    d = lr_oracle[1].shape[0]
    att = IFAttributorArnoldi(
        _lr_task(lr_problem), proj_dim=d, max_iter=d, regularization=L2, tol=1e-12
    )
    np.testing.assert_allclose(_scores(att, lr_problem), lr_oracle[0], rtol=1e-7, atol=1e-9)


def test_arnoldi_low_rank_and_ratio_match_eigen_oracle(lr_problem):
    """proj_dim=5 on the Hessian of the first half of the samples vs a numpy eigh oracle."""
    p = lr_problem
    model = _lr_model()
    half = N_TRAIN // 2
    _, H_half = _oracle(
        model,
        p["state"],
        _ce_loss(model),
        _ce_loss(model),
        (p["Xtr"][:half], p["ytr"][:half]),
        (p["Xte"], p["yte"]),
        0.0,
    )
    evals, evecs = np.linalg.eigh(H_half)
    top = np.argsort(-np.abs(evals))[:5]
    U, lam = evecs[:, top], evals[top]
    d = H_half.shape[0]
    att = IFAttributorArnoldi(
        _lr_task(p),
        precompute_data_ratio=0.5,
        proj_dim=5,
        max_iter=d,
        tol=1e-12,
        regularization=0.1,
    )
    got = _scores(att, p, cache_bs=7)  # the half boundary falls inside a batch
    # oracle gradients
    gtr = _oracle_grads(p, model)
    gte = _oracle_grads(p, model, test=True)
    ref = gtr @ (U / (lam + 0.1)) @ U.T @ gte.T
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9)
    assert att.hyperparameters()["precompute_data_ratio"] == 0.5


def test_arnoldi_low_rank_scores_through_the_basis_match_the_ihvp(lr_problem):
    """With proj_dim < n_test, attribute() scores through the rank-r basis
    (G_train U diag(1/(λ+values)) Uᵀ G_testᵀ); it must equal G_train @ ihvp(G_test)ᵀ and
    self_attribute (which uses the plain inverse-HVP) must stay its diagonal."""
    p = lr_problem
    att = IFAttributorArnoldi(_lr_task(p), proj_dim=4, max_iter=12, tol=1e-12, regularization=L2)
    att.cache(_loader(p["Xtr"], p["ytr"], N_TRAIN))
    X, y = p["Xtr"][:30], p["ytr"][:30]
    full = att.attribute(_loader(X, y, 11), _loader(X, y, 7))
    g = att._all_grads(_loader(X, y, 30), "loss", 0)
    ref = g @ att._ihvp(0, g).T
    np.testing.assert_allclose(_np(full), _np(ref), rtol=1e-10, atol=1e-13)
    self_s = att.self_attribute(_loader(X, y, 11))
    np.testing.assert_allclose(_np(self_s), np.diag(_np(full)), rtol=1e-9, atol=1e-12)


def _oracle_grads(p, model, test=False):
    X, y = (p["Xte"], p["yte"]) if test else (p["Xtr"], p["ytr"])
    rows = []
    for i in range(X.shape[0]):
        t = p["theta"].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(
            F.cross_entropy(
                X[i : i + 1] @ _flat_to_params(t)["weight"].T + _flat_to_params(t)["bias"],
                y[i : i + 1],
            ),
            t,
        )
        rows.append(g)
    return torch.stack(rows).numpy()


# ---------------------------------------------------------------------------- 3. self-influence, batching
def _all_attributors(task, d, reg=L2):
    return [
        IFAttributorExplicit(task, regularization=reg),
        IFAttributorCG(task, max_iter=25, tol=1e-12, regularization=reg),
        IFAttributorLiSSA(
            task, batch_size=N_TRAIN, recursion_depth=8, scaling=5.0, damping=reg / 5.0, seed=4
        ),
        IFAttributorLiSSA(
            task,
            batch_size=5,
            recursion_depth=8,
            scaling=5.0,
            damping=reg / 5.0,
            seed=4,
            mode="rev-fwd",
        ),
        IFAttributorArnoldi(task, proj_dim=d, max_iter=d, regularization=reg),
    ]


@pytest.mark.parametrize("target", [None, _margin_target], ids=["target=loss", "target=margin"])
def test_self_attribute_is_diagonal_of_attribute(lr_problem, target):
    p = lr_problem
    task = _lr_task(p, target=target)
    n = 30
    X, y = p["Xtr"][:n], p["ytr"][:n]
    for att in _all_attributors(task, 18):
        att.cache(_loader(p["Xtr"], p["ytr"], N_TRAIN))
        full = att.attribute(_loader(X, y, 11), _loader(X, y, 7))  # 3 and 5 batches
        self_s = att.self_attribute(_loader(X, y, 11))
        assert self_s.shape == (n,)
        np.testing.assert_allclose(
            _np(self_s), np.diag(_np(full)), rtol=1e-9, atol=1e-12, err_msg=type(att).__name__
        )


def test_target_func_is_used_on_the_test_side(lr_problem):
    p = lr_problem
    model = _lr_model()
    ref, _ = _oracle(
        model,
        p["state"],
        _ce_loss(model),
        _margin_target(model),
        (p["Xtr"], p["ytr"]),
        (p["Xte"], p["yte"]),
        L2,
    )
    att = IFAttributorExplicit(_lr_task(p, target=_margin_target), regularization=L2)
    np.testing.assert_allclose(_scores(att, p), ref, rtol=1e-9, atol=1e-11)


def test_cache_batching_does_not_change_the_result(lr_problem):
    """Mean-loss Hessian over the whole loader, not a sum of per-batch inverses."""
    p = lr_problem
    task = _lr_task(p)
    for cls, kw in [
        (IFAttributorExplicit, {}),
        (IFAttributorCG, {"max_iter": 25, "tol": 1e-12}),
        (IFAttributorArnoldi, {"proj_dim": 18, "max_iter": 18}),
    ]:
        single = _scores(cls(task, regularization=L2, **kw), p, cache_bs=N_TRAIN)
        # 9 batches, the last one of 8 samples
        multi = _scores(cls(task, regularization=L2, **kw), p, cache_bs=9)
        np.testing.assert_allclose(multi, single, rtol=1e-9, atol=1e-12, err_msg=cls.__name__)
    # deterministic LiSSA too (its sampler sees the same samples whatever the batching)
    # and stochastic LiSSA: samples are drawn from the concatenated cache, so batching does not matter
    for bs in (N_TRAIN, 5):
        kw = dict(batch_size=bs, recursion_depth=8, scaling=5.0, damping=0.01, seed=2)
        multi = _scores(IFAttributorLiSSA(task, **kw), p, cache_bs=9)
        single = _scores(IFAttributorLiSSA(task, **kw), p, cache_bs=N_TRAIN)
        np.testing.assert_allclose(multi, single, rtol=1e-9, atol=1e-12)


def test_test_side_is_solved_once_per_checkpoint(lr_problem, monkeypatch):
    calls = []
    real = solvers.conjugate_gradient

    def counting(matvec, B, **kw):
        calls.append(B.shape[0])
        return real(matvec, B, **kw)

    monkeypatch.setattr(solvers, "conjugate_gradient", counting)
    p = lr_problem
    att = IFAttributorCG(_lr_task(p), max_iter=30, regularization=L2)
    ref = _scores(att, p, train_bs=8, test_bs=3)  # 10 train batches, 3 test batches
    assert calls == [N_TEST]
    calls.clear()
    att.rhs_chunk_size = 3  # chunks of the test side: 3 + 3 + 2 rows, same numbers
    again = _np(att.attribute(_loader(p["Xtr"], p["ytr"], 8), _loader(p["Xte"], p["yte"], 3)))
    assert calls == [3, 3, 2]
    np.testing.assert_allclose(again, ref, rtol=1e-10, atol=1e-13)
    calls.clear()
    att.rhs_chunk_size = None  # automatic: rows whose 6 solver vectors fit the budget
    att.solver_memory_bytes = 6 * 18 * 8 * 3
    again = _np(att.attribute(_loader(p["Xtr"], p["ytr"], 8), _loader(p["Xte"], p["yte"], 3)))
    assert calls == [3, 3, 2]
    np.testing.assert_allclose(again, ref, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------- 4. ensemble, layers
def test_ensemble_is_average_of_checkpoints(lr_problem):
    p = lr_problem
    g = torch.Generator().manual_seed(7)
    other = {
        k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=DT) for k, v in p["state"].items()
    }
    model = _lr_model()
    ref0, _ = _oracle(
        model,
        p["state"],
        _ce_loss(model),
        _ce_loss(model),
        (p["Xtr"], p["ytr"]),
        (p["Xte"], p["yte"]),
        L2,
    )
    ref1, _ = _oracle(
        model,
        other,
        _ce_loss(model),
        _ce_loss(model),
        (p["Xtr"], p["ytr"]),
        (p["Xte"], p["yte"]),
        L2,
    )
    assert np.abs(ref0 - ref1).max() > 1e-2 * np.abs(ref0).max()  # the checkpoints really differ
    task = _lr_task(p, checkpoints=[p["state"], other])
    for att in (
        IFAttributorExplicit(task, regularization=L2),
        IFAttributorCG(task, max_iter=40, tol=1e-12, regularization=L2),
    ):
        got = _scores(att, p, cache_bs=N_TRAIN)
        np.testing.assert_allclose(got, 0.5 * (ref0 + ref1), rtol=1e-7, atol=1e-9)
    self_s = _np(att.self_attribute(_loader(p["Xtr"], p["ytr"], 25)))
    full = _np(att.attribute(_loader(p["Xtr"], p["ytr"], 25), _loader(p["Xtr"], p["ytr"], 40)))
    np.testing.assert_allclose(self_s, np.diag(full), rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def mlp_problem(lr_problem):
    p = lr_problem
    model = _mlp_model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _, H = _oracle(
        model,
        state,
        _ce_loss(model),
        _ce_loss(model),
        (p["Xtr"], p["ytr"]),
        (p["Xte"][:1], p["yte"][:1]),
        0,
    )
    reg = 0.05 + max(0.0, -float(np.linalg.eigvalsh(H).min()))
    return dict(state=state, reg=reg)


@pytest.mark.parametrize(
    "layer", [None, "fc2", ["fc1.weight", "fc2.bias"]], ids=["all", "fc2", "mixed"]
)
def test_layer_restriction_equals_hessian_sub_block(lr_problem, mlp_problem, layer):
    p, m = lr_problem, mlp_problem
    model = _mlp_model()
    names = None
    if layer is not None:
        names = ["fc2.weight", "fc2.bias"] if layer == "fc2" else layer
    ref, _ = _oracle(
        model,
        m["state"],
        _ce_loss(model),
        _ce_loss(model),
        (p["Xtr"], p["ytr"]),
        (p["Xte"], p["yte"]),
        m["reg"],
        names=names,
    )
    task = AttributionTask(_ce_loss(model), model, m["state"])
    att = IFAttributorExplicit(task, layer_name=layer, regularization=m["reg"])
    np.testing.assert_allclose(_scores(att, p, cache_bs=30), ref, rtol=1e-8, atol=1e-10)
    for mode in ("rev-rev", "rev-fwd"):
        cg = IFAttributorCG(
            task, layer_name=layer, max_iter=100, tol=1e-12, mode=mode, regularization=m["reg"]
        )
        np.testing.assert_allclose(_scores(cg, p, cache_bs=N_TRAIN), ref, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------- 5. bad input
def _raises(exc, match_any, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert any(s in msg for s in match_any), msg
    return msg


def test_attribute_before_cache(lr_problem):
    # Arnoldi refuses (a ValueError too, as dattri's); the other methods cache on demand
    # (tests/algorithm/test_influence_function_parity.py)
    p = lr_problem
    att = IFAttributorArnoldi(_lr_task(p))
    tr, te = _loader(p["Xtr"], p["ytr"], 16), _loader(p["Xte"], p["yte"], 4)
    for call, args in ((att.attribute, (tr, te)), (att.self_attribute, (tr,))):
        msg = _raises(NotCachedError, ["cache(train_loader)"], call, *args)
        assert "The Arnoldi projector has not been cached" in msg
        with pytest.raises(ValueError):
            call(*args)


@pytest.mark.parametrize(
    "cls", [IFAttributorExplicit, IFAttributorCG, IFAttributorLiSSA, IFAttributorArnoldi]
)
def test_unknown_layer_name(lr_problem, cls):
    _raises(ConfigError, ["available parameters"], cls, _lr_task(lr_problem), layer_name="fc9")


@pytest.mark.parametrize(
    "cls", [IFAttributorExplicit, IFAttributorCG, IFAttributorLiSSA, IFAttributorArnoldi]
)
def test_empty_loaders(lr_problem, cls):
    p = lr_problem
    empty = DataLoader(TensorDataset(p["Xtr"][:0], p["ytr"][:0]), batch_size=4)
    tr, te = _loader(p["Xtr"], p["ytr"], 40), _loader(p["Xte"], p["yte"], 4)
    att = cls(
        _lr_task(p), **({"batch_size": 4, "recursion_depth": 2} if cls is IFAttributorLiSSA else {})
    )
    _raises(DataError, ["pass a DataLoader"], att.cache, empty)
    att.cache(tr)
    _raises(DataError, ["pass a DataLoader"], att.attribute, tr, empty)
    _raises(DataError, ["pass a DataLoader"], att.attribute, empty, te)
    _raises(DataError, ["pass a DataLoader"], att.self_attribute, empty)


def test_nan_loss(lr_problem):
    p = lr_problem
    Xbad = p["Xtr"].clone()
    Xbad[17, 2] = float("nan")
    for cls in (IFAttributorExplicit, IFAttributorCG, IFAttributorLiSSA, IFAttributorArnoldi):
        att = cls(_lr_task(p))
        msg = _raises(NonFiniteError, ["NaN inputs"], att.cache, _loader(Xbad, p["ytr"], 16))
        assert "batch 1" in msg  # sample 17 lies in the second batch
    att = IFAttributorCG(_lr_task(p), regularization=L2)
    att.cache(_loader(p["Xtr"], p["ytr"], 16))
    Xte = p["Xte"].clone()
    Xte[0, 0] = float("inf")
    _raises(
        NonFiniteError,
        ["check the model"],
        att.attribute,
        _loader(p["Xtr"], p["ytr"], 16),
        _loader(Xte, p["yte"], 4),
    )


def test_singular_hessian_without_regularization(lr_problem):
    """A parameter the loss ignores gives a zero Hessian row: explicit IF must say to regularise."""
    p = lr_problem

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(D_IN, N_CLS)
            self.unused = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.lin(x)

    model = Padded().to(DT)
    task = AttributionTask(
        _ce_loss(model), model, {k: v.detach() for k, v in model.state_dict().items()}
    )
    att = IFAttributorExplicit(task)
    _raises(NonFiniteError, ["regularization > 0"], att.cache, _loader(p["Xtr"], p["ytr"], 40))
    ok = IFAttributorExplicit(task, regularization=0.1)
    ok.cache(_loader(p["Xtr"], p["ytr"], 40))
    assert np.isfinite(_np(ok.self_attribute(_loader(p["Xtr"], p["ytr"], 40)))).all()


def test_mismatched_checkpoint(lr_problem):
    p = lr_problem
    bad = {
        "weight": torch.zeros(N_CLS + 1, D_IN, dtype=DT),
        "bias": torch.zeros(N_CLS + 1, dtype=DT),
    }
    model = _lr_model()
    _raises(
        CheckpointError, ["saved from this model"], AttributionTask, _ce_loss(model), model, bad
    )
    # the second checkpoint is only checked when used
    task = AttributionTask(_ce_loss(model), model, [p["state"], bad])
    for att in (IFAttributorExplicit(task, regularization=L2), IFAttributorCG(task)):
        _raises(
            CheckpointError, ["saved from this model"], att.cache, _loader(p["Xtr"], p["ytr"], 40)
        )


def test_explicit_memory_limit(lr_problem):
    task = _lr_task(lr_problem)
    msg = _raises(
        MemoryLimitError,
        ["max_dense_bytes"],
        IFAttributorExplicit,
        task,
        max_dense_bytes=18 * 18 * 8 - 1,
    )
    assert "layer_name" in msg
    IFAttributorExplicit(task, max_dense_bytes=18 * 18 * 8)  # exactly fits
    assert (
        IFAttributorExplicit(task).hyperparameters()["max_dense_bytes"] is None
    )  # the planner's budget
    msg = _raises(
        MemoryLimitError,
        ["memory_budget"],
        IFAttributorExplicit,
        task,
        memory_budget=18 * 18 * 8 - 1,
    )
    IFAttributorExplicit(task, memory_budget=18 * 18 * 8)


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (IFAttributorExplicit, {"regularization": -1.0}, "regularization"),
        (IFAttributorExplicit, {"regularization": float("nan")}, "regularization"),
        (IFAttributorExplicit, {"max_dense_bytes": 0}, "max_dense_bytes"),
        (IFAttributorCG, {"max_iter": 0}, "max_iter"),
        (IFAttributorCG, {"max_iter": 2.5}, "max_iter"),
        (IFAttributorCG, {"tol": -1e-3}, "tol"),
        (IFAttributorCG, {"mode": "fwd-fwd"}, "mode"),
        (IFAttributorCG, {"regularization": -0.1}, "regularization"),
        (IFAttributorLiSSA, {"batch_size": 0}, "batch_size"),
        (IFAttributorLiSSA, {"num_repeat": 0}, "num_repeat"),
        (IFAttributorLiSSA, {"recursion_depth": 0}, "recursion_depth"),
        (IFAttributorLiSSA, {"damping": 1.0}, "damping"),
        (IFAttributorLiSSA, {"damping": -0.1}, "damping"),
        (IFAttributorLiSSA, {"scaling": 0.0}, "scaling"),
        (IFAttributorLiSSA, {"mode": "rev"}, "mode"),
        (IFAttributorLiSSA, {"seed": -1}, "seed"),
        (IFAttributorArnoldi, {"precompute_data_ratio": 0.0}, "precompute_data_ratio"),
        (IFAttributorArnoldi, {"precompute_data_ratio": 1.5}, "precompute_data_ratio"),
        (IFAttributorArnoldi, {"proj_dim": 0}, "proj_dim"),
        (IFAttributorArnoldi, {"max_iter": 0}, "max_iter"),
        (IFAttributorArnoldi, {"norm_constant": 0.0}, "norm_constant"),
        (IFAttributorArnoldi, {"tol": -1.0}, "tol"),
        (IFAttributorArnoldi, {"regularization": -1.0}, "regularization"),
        (IFAttributorArnoldi, {"seed": 1.5}, "seed"),
    ],
)
def test_bad_hyperparameters(lr_problem, cls, kwargs, name):
    msg = _raises(ConfigError, [name], cls, _lr_task(lr_problem), **kwargs)
    assert "pass" in msg or "one of" in msg, msg


def test_lissa_batch_size_larger_than_data(lr_problem):
    p = lr_problem
    att = IFAttributorLiSSA(_lr_task(p), batch_size=N_TRAIN + 1)
    _raises(ConfigError, [f"batch_size <= {N_TRAIN}"], att.cache, _loader(p["Xtr"], p["ytr"], 40))


# ---------------------------------------------------------------------------- 6. arguments act
def test_cg_tol_and_max_iter_change_the_result(lr_problem, lr_oracle):
    p, ref = lr_problem, lr_oracle[0]
    task = _lr_task(p)

    def err(**kw):
        s = _scores(IFAttributorCG(task, regularization=L2, **kw), p)
        return float(np.abs(s - ref).max() / np.abs(ref).max()), s

    e_short, s_short = err(max_iter=2, tol=0.0)
    e_long, s_long = err(max_iter=60, tol=1e-12)
    e_loose, s_loose = err(max_iter=60, tol=0.3)
    assert e_long < 1e-8
    assert e_short > 1e-3 and e_loose > 1e-4, (e_short, e_loose)
    assert not np.allclose(s_short, s_long) and not np.allclose(s_loose, s_long)


def test_lissa_arguments_change_the_result(lr_problem):
    p = lr_problem
    task = _lr_task(p, l2_in_loss=True)
    base = dict(batch_size=10, recursion_depth=6, scaling=5.0, damping=0.0, num_repeat=1, seed=0)
    ref = _scores(IFAttributorLiSSA(task, **base), p)
    for key, val in [
        ("batch_size", 20),
        ("recursion_depth", 7),
        ("scaling", 6.0),
        ("damping", 0.01),
        ("num_repeat", 2),
        ("seed", 5),
    ]:
        s = _scores(IFAttributorLiSSA(task, **{**base, key: val}), p)
        assert np.abs(s - ref).max() > 1e-8 * np.abs(ref).max(), key
    rf = _scores(IFAttributorLiSSA(task, **{**base, "mode": "rev-fwd"}), p)
    np.testing.assert_allclose(rf, ref, rtol=1e-9, atol=1e-12)  # mode changes how, not what


def test_arnoldi_arguments(lr_problem, lr_oracle):
    p = lr_problem
    task = _lr_task(p)
    base = dict(proj_dim=3, max_iter=6, regularization=L2, tol=1e-12, seed=0)
    ref = _scores(IFAttributorArnoldi(task, **base), p, cache_bs=N_TRAIN)
    # a partial Krylov space depends on the start vector; norm_constant only rescales the range
    other_seed = _scores(IFAttributorArnoldi(task, **{**base, "seed": 1}), p, cache_bs=N_TRAIN)
    assert np.abs(other_seed - ref).max() > 1e-6 * np.abs(ref).max()
    scaled = _scores(
        IFAttributorArnoldi(task, **{**base, "norm_constant": 10.0}), p, cache_bs=N_TRAIN
    )
    np.testing.assert_allclose(scaled, ref, rtol=1e-8, atol=1e-10)
    for key, val in [("proj_dim", 2), ("max_iter", 7), ("regularization", 0.1), ("tol", 0.5)]:
        s = _scores(IFAttributorArnoldi(task, **{**base, key: val}), p, cache_bs=N_TRAIN)
        assert np.abs(s - ref).max() > 1e-6 * np.abs(ref).max(), key


def test_hyperparameters_resolved(lr_problem):
    task = _lr_task(lr_problem)
    hp = IFAttributorCG(
        task, max_iter=7, tol=1e-3, mode="rev-fwd", regularization=0.5
    ).hyperparameters()
    assert hp == {
        "method": "IFAttributorCG",
        "layer_name": None,
        "num_checkpoints": 1,
        "max_iter": 7,
        "tol": 1e-3,
        "mode": "rev-fwd",
        "regularization": 0.5,
        "hessian": "exact",
        "ggn_output": None,
    }
    hp = IFAttributorLiSSA(task).hyperparameters()
    assert (
        hp["recursion_depth"] == 5000
        and hp["scaling"] == 50.0
        and hp["seed"] == 0
        and hp["batch_size"] == 1
    )
    hp = IFAttributorArnoldi(task, proj_dim=4).hyperparameters()
    assert hp["proj_dim"] == 4 and hp["max_iter"] == 100 and hp["norm_constant"] == 1.0


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_matches_cpu(lr_problem, lr_oracle):
    p = lr_problem
    for cls, kw in [(IFAttributorExplicit, {}), (IFAttributorCG, {"max_iter": 50, "tol": 1e-12})]:
        att = cls(_lr_task(p), device="cuda", regularization=L2, **kw)
        got = _scores(att, p)
        np.testing.assert_allclose(got, lr_oracle[0], rtol=1e-7, atol=1e-9)
