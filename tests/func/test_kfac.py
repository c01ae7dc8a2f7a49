"""Oracle tests of func/kfac.py: exact K-FAC cases against a dense GGN, EK-FAC eigenvalues against
the dense Fisher in the Kronecker eigenbasis, damping forms, partitions, resume and provenance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

import tdabench.func.kfac as kfac_mod
from tdabench.errors import KeyMismatchError
from tdabench.func.kfac import fit_kfac
from tdabench.task import AttributionTask


@pytest.fixture(autouse=True)
def _float64_default():
    """float64 by default inside this module's tests only (restored after each test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _task(model: nn.Module, loss) -> AttributionTask:
    model.eval()
    return AttributionTask(
        lambda p, d: loss(functional_call(model, p, (d[0],)), d[1]), model, model.state_dict()
    )


def _ce(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _oracle_grads(task: AttributionTask, x, y) -> torch.Tensor:
    """Per-sample flat gradients (N, d) in the task's ParamSpec order, by torch.func."""
    spec = task.param_spec()
    params = task.get_params(0)

    def one(p, xi, yi):
        return task.loss_func(p, (xi[None], yi[None]))

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in spec.names], dim=1)


def _fisher_block(G: torch.Tensor, lf, spec) -> torch.Tensor:
    """Dense empirical Fisher of one layer in W̃ = [W | b] row-major order."""
    a, b = spec.offsets(lf.param_names[0])
    W = G[:, a:b].reshape(G.shape[0], lf.shape[0], -1)
    if lf.has_bias:
        a, b = spec.offsets(lf.param_names[1])
        W = torch.cat([W, G[:, a:b, None]], dim=-1)
    V = W.reshape(G.shape[0], -1)
    return V.T @ V / G.shape[0]


def test_kfac_equals_dense_ggn_when_gradients_are_independent_of_inputs() -> None:
    """Linear layer, loss ½(uᵀs - y)² with residuals ±1: g gᵀ = u uᵀ for every sample, so the
    GGN (1/N) Σ Jᵀ u uᵀ J equals A ⊗ S exactly and K-FAC's damped inverse is the dense one."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    u = torch.tensor([0.7, -1.3])
    x = torch.randn(6, 3)
    r = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    y = model(x).detach() @ u - r
    task = _task(model, lambda s, t: 0.5 * ((s @ u - t) ** 2).mean())
    op = fit_kfac(task, DataLoader(TensorDataset(x, y), batch_size=4), strategy="kfac")
    spec = task.param_spec()
    flat = task.flat_params(0)

    def out(p, xi):
        return functional_call(model, spec.unflatten(p), (xi[None],))[0]

    J = vmap(jacrev(out), in_dims=(None, 0))(flat, x)  # (N, 2, d)
    ggn = torch.einsum("noi,o,p,npj->ij", J, u, u, J) / x.shape[0]
    lam = 0.05
    want = torch.linalg.inv(ggn + lam * torch.eye(spec.dim))
    got = op.inverse_mvp(torch.eye(spec.dim), damping=lam, spec=spec)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(op.mvp(torch.eye(spec.dim), spec=spec), ggn, rtol=1e-10, atol=1e-12)


def test_kfac_is_exact_for_one_training_sample() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))
    task = _task(model, _ce)
    x, y = torch.randn(1, 4), torch.tensor([2])
    op = fit_kfac(task, [(x, y)], strategy="kfac")
    spec = task.param_spec()
    G = _oracle_grads(task, x, y)
    for lf in op.layers:
        F_l = _fisher_block(G, lf, spec)
        got = lf.mvp(torch.eye(F_l.shape[0]).reshape(-1, *lf.shape)).reshape(F_l.shape[0], -1)
        torch.testing.assert_close(got, F_l, rtol=1e-9, atol=1e-12)


class _SeqModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 4)
        self.head = nn.Linear(4, 5, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


@pytest.mark.parametrize("seq", [False, True])
def test_ekfac_eigenvalues_are_the_dense_fisher_diagonal_in_the_kronecker_basis(seq: bool) -> None:
    torch.manual_seed(2)
    if seq:
        model, x, y = _SeqModel(), torch.randn(9, 3, 3), torch.randint(0, 5, (9, 3))
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        x, y = torch.randn(9, 3), torch.randint(0, 3, (9,))
    task = _task(model, _ce)
    op = fit_kfac(task, DataLoader(TensorDataset(x, y), batch_size=4), strategy="ekfac")
    spec = task.param_spec()
    G = _oracle_grads(task, x, y)
    for lf in op.layers:
        K = torch.kron(lf.q_s, lf.q_a)
        diag = torch.diagonal(K.T @ _fisher_block(G, lf, spec) @ K)
        torch.testing.assert_close(lf.lam.reshape(-1), diag, rtol=1e-9, atol=1e-12)
    if not seq:  # S from the oracle's bias gradients (g itself for T = 1), A from the inputs
        gb = G[:, slice(*spec.offsets("2.bias"))]
        S = op.layers[1].q_s @ torch.diag(op.layers[1].eig_s) @ op.layers[1].q_s.T
        torch.testing.assert_close(S, gb.T @ gb / 9, rtol=1e-10, atol=1e-12)
        a = torch.cat([x, torch.ones(9, 1)], 1)
        A = op.layers[0].q_a @ torch.diag(op.layers[0].eig_a) @ op.layers[0].q_a.T
        torch.testing.assert_close(A, a.T @ a / 9, rtol=1e-10, atol=1e-12)


def test_damping_forms_match_a_dense_solve() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    task = _task(model, _ce)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    for strategy in ("kfac", "ekfac"):
        op = fit_kfac(task, [(x, y)], strategy=strategy)
        dense = op.dense()
        V = torch.randn(5, op.dim)
        for damping, factor in ((0.1, None), (0.0, 0.1), (0.02, 0.3)):
            lams = [lf.damping(damping, factor) for lf in op.layers]
            means = [float(lf.eigenvalues().mean()) for lf in op.layers]
            assert lams == pytest.approx([damping + (factor or 0) * m for m in means])
            D = torch.diag(
                torch.cat(
                    [
                        torch.full((lf.shape[0] * lf.shape[1],), lam)
                        for lf, lam in zip(op.layers, lams, strict=True)
                    ]
                )
            )
            want = torch.linalg.solve(dense + D, V.T).T
            torch.testing.assert_close(
                op.inverse_mvp(V, damping, factor), want, rtol=1e-9, atol=1e-10
            )


def _data(n: int = 20):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(n, 3), torch.randint(0, 3, (n,))
    return _task(model, _ce), DataLoader(TensorDataset(x, y), batch_size=4)


def _same(a, b) -> None:
    eye = torch.eye(a.dim)
    torch.testing.assert_close(a.mvp(eye), b.mvp(eye), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        a.inverse_mvp(eye, 1e-3), b.inverse_mvp(eye, 1e-3), rtol=1e-8, atol=1e-9
    )


def test_partitioned_fit_equals_one_shot_and_is_reused(tmp_path, monkeypatch) -> None:
    task, loader = _data()
    one = fit_kfac(task, loader)
    parts = fit_kfac(task, loader, factor_dir=tmp_path / "f", num_partitions=3)
    _same(one, parts)
    assert sorted(p.name for p in (tmp_path / "f").glob("*-of-3.safetensors")) == [
        f"{s}-{i}-of-3.safetensors" for s in ("covariance", "lambda") for i in range(3)
    ]
    calls = []
    real = kfac_mod.capture_task
    monkeypatch.setattr(kfac_mod, "capture_task", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = fit_kfac(task, loader, factor_dir=tmp_path / "f", num_partitions=3)
    assert calls == [] and again.key == parts.key
    _same(one, again)


def test_resume_after_an_interrupted_partition(tmp_path, monkeypatch) -> None:
    task, loader = _data()  # 5 batches -> partitions {0, 1}, {2, 3}, {4}
    one = fit_kfac(task, loader)
    real = kfac_mod.capture_task
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # inside the third covariance partition
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(kfac_mod, "capture_task", failing)
    with pytest.raises(KeyboardInterrupt):
        fit_kfac(task, loader, factor_dir=tmp_path, num_partitions=3)
    assert (tmp_path / "covariance-1-of-3.safetensors").is_file()
    assert not (tmp_path / "covariance-2-of-3.safetensors").exists()
    calls.clear()
    monkeypatch.setattr(kfac_mod, "capture_task", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = fit_kfac(task, loader, factor_dir=tmp_path, num_partitions=3)
    assert len(calls) == 1 + 5  # the last covariance partition, then the eigenvalue correction
    _same(one, resumed)


def test_a_mismatching_key_is_an_error(tmp_path) -> None:
    task, loader = _data()
    fit_kfac(task, loader, factor_dir=tmp_path)
    with pytest.raises(KeyMismatchError, match="strategy"):
        fit_kfac(task, loader, factor_dir=tmp_path, strategy="kfac")
    x, y = loader.dataset.tensors
    with pytest.raises(KeyMismatchError, match="data"):
        fit_kfac(task, [(x[:-1], y[:-1])], factor_dir=tmp_path)
    with torch.no_grad():
        task.model[0].weight.add_(1.0)
    moved = AttributionTask(task.loss_func, task.model, task.model.state_dict())
    with pytest.raises(KeyMismatchError, match="params_sha256"):
        fit_kfac(moved, loader, factor_dir=tmp_path)
    # batching does not change the key: the same data in other batches reuses the factors
    fit_kfac(task, DataLoader(TensorDataset(x, y), batch_size=7), factor_dir=tmp_path)


def test_true_fisher_samples_labels_from_the_model() -> None:
    """Zero weights: p is uniform whatever the input, so E_y[g gᵀ] = diag(p) - p pᵀ; 6,000 seeded
    draws put the sampled S within 0.02 of it (deterministic: same seed, same factors)."""
    model = nn.Linear(2, 3)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    task = _task(model, _ce)
    x, y = torch.randn(6000, 2), torch.zeros(6000, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=1000)
    op = fit_kfac(task, loader, strategy="kfac", fisher="true", seed=5)
    lf = op.layers[0]
    S = lf.q_s @ torch.diag(lf.eig_s) @ lf.q_s.T
    p = torch.full((3,), 1 / 3)
    torch.testing.assert_close(S, torch.diag(p) - torch.outer(p, p), rtol=0, atol=0.02)
    emp = fit_kfac(task, loader, strategy="kfac").layers[0]  # empirical, all labels 0: g = p - e_0
    g0 = p - torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(
        emp.q_s @ torch.diag(emp.eig_s) @ emp.q_s.T, torch.outer(g0, g0), rtol=0, atol=1e-12
    )
    again = fit_kfac(task, loader, strategy="kfac", fisher="true", seed=5).layers[0]
    torch.testing.assert_close(again.eig_s, lf.eig_s, rtol=0, atol=0)


def _layer_index(lf, spec) -> torch.Tensor:
    """Flat-vector index of every entry of W̃ = [W | b] in row-major order."""
    d_out, d_in = lf.shape
    w0, _ = spec.offsets(lf.param_names[0])
    n_w = d_in - 1 if lf.has_bias else d_in
    idx = torch.empty(d_out, d_in, dtype=torch.long)
    idx[:, :n_w] = w0 + torch.arange(d_out)[:, None] * n_w + torch.arange(n_w)[None, :]
    if lf.has_bias:
        idx[:, -1] = spec.offsets(lf.param_names[1])[0] + torch.arange(d_out)
    return idx.reshape(-1)


def _dense_ggn(task: AttributionTask, x: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_i J_iᵀ (diag(p_i) - p_i p_iᵀ) J_i with J = ∂logits/∂θ by jacrev (softmax cross-entropy)."""
    spec = task.param_spec()
    flat = task.flat_params(0)

    def logits(p, xi):
        return functional_call(task.model, spec.unflatten(p), (xi[None],))[0]

    J = vmap(jacrev(logits), in_dims=(None, 0))(flat, x)  # (N, C, d)
    p = torch.softmax(vmap(logits, in_dims=(None, 0))(flat, x), dim=-1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nci,ncd,ndj->ij", J, H, J) / x.shape[0]


def test_ggn_kfac_is_exact_when_probabilities_do_not_depend_on_the_input() -> None:
    """Zero weights: p is the same for every input, so the GGN is H ⊗ A exactly (fisher='ggn')."""
    torch.manual_seed(6)
    model = nn.Linear(3, 4)
    nn.init.zeros_(model.weight)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.3, -0.2, 0.5, 0.0]))
    task = _task(model, _ce)
    x = torch.randn(7, 3)
    op = fit_kfac(
        task,
        DataLoader(TensorDataset(x, torch.randint(0, 4, (7,))), batch_size=3),
        strategy="kfac",
        fisher="ggn",
    )
    spec = task.param_spec()
    ggn = _dense_ggn(task, x)
    eye = torch.eye(spec.dim)
    torch.testing.assert_close(op.mvp(eye, spec=spec), ggn, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        op.inverse_mvp(eye, 0.05, spec=spec),
        torch.linalg.inv(ggn + 0.05 * eye),
        rtol=1e-9,
        atol=1e-9,
    )


def test_ggn_ekfac_eigenvalues_are_the_dense_ggn_diagonal_in_the_kronecker_basis() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))
    task = _task(model, _ce)
    x = torch.randn(10, 3)
    op = fit_kfac(
        task, DataLoader(TensorDataset(x, torch.randint(0, 3, (10,))), batch_size=4), fisher="ggn"
    )
    spec = task.param_spec()
    ggn = _dense_ggn(task, x)
    for lf in op.layers:
        idx = _layer_index(lf, spec)
        K = torch.kron(lf.q_s, lf.q_a)
        torch.testing.assert_close(
            lf.lam.reshape(-1), torch.diagonal(K.T @ ggn[idx][:, idx] @ K), rtol=1e-9, atol=1e-12
        )
