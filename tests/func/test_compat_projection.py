"""dattri's projector names over tdabench's Projector: exact against independent constructions."""

from __future__ import annotations

import pytest
import torch

from tdabench.errors import ConfigError, ShapeError
from tdabench.func.projection import (
    AbstractProjector,
    ArnoldiProjector,
    BasicProjector,
    ChunkedCudaProjector,
    CudaProjector,
    ProjectionType,
    arnoldi_project,
    make_projector,
    make_random_projector,
    random_project,
)


def _x(b=6, d=40, seed=0, dtype=torch.float64):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_dense_types_are_tdabench_projectors_with_dattri_ensemble_seeds():
    x = _x()
    for dattri_name, ours in (
        ("normal", "gaussian"),
        ("rademacher", "rademacher"),
        ("sjlt", "sparse"),
    ):
        p = BasicProjector(40, 8, seed=3, proj_type=dattri_name, device="cpu", dtype=torch.float64)
        assert isinstance(p, AbstractProjector)
        ref0 = make_projector(40, 8, 3, ours, dtype=torch.float64).project(x)
        ref2 = make_projector(40, 8, 3 + 200_000, ours, dtype=torch.float64).project(x)
        assert torch.equal(p.project(x, ensemble_id=0), ref0)
        assert torch.equal(p.project(x, ensemble_id=2), ref2)
        assert torch.equal(p.project(x, ensemble_id=0), ref0)  # back to ensemble 0: same matrix
        assert not torch.equal(ref0, ref2)


def test_random_mask_identity_and_grass():
    x = _x()
    mask = BasicProjector(40, 5, 7, ProjectionType.random_mask, "cpu", dtype=torch.float64)
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(7))[:5].sort().values
    assert torch.equal(mask.project(x, 0), x[:, idx])  # unscaled, as dattri
    ident = BasicProjector(40, 40, 0, "identity", "cpu", dtype=torch.float64)
    assert torch.equal(ident.project(x, 0), x)
    grass = BasicProjector(40, 4, 7, "grass_2", "cpu", dtype=torch.float64)
    assert grass.grass_multiplier == 2
    gidx = torch.randperm(40, generator=torch.Generator().manual_seed(7))[:8].sort().values
    ref = make_projector(8, 4, 8, "sparse", dtype=torch.float64).project(x[:, gidx])
    assert torch.equal(grass.project(x, 0), ref)
    with pytest.raises(ConfigError):
        BasicProjector(4, 5, 0, "random_mask", "cpu")
    with pytest.raises(ConfigError):
        BasicProjector(4, 2, 0, "grass_x", "cpu")
    with pytest.raises(ConfigError):
        BasicProjector(4, 2, 0, "bogus", "cpu")


def test_dict_features_and_half_precision():
    g = torch.Generator().manual_seed(1)
    feats = {
        "w": torch.randn(3, 2, 5, generator=g),
        "b": torch.randn(3, generator=g),
    }  # 10 + 1 columns
    flat = torch.cat([feats["w"].reshape(3, -1), feats["b"].reshape(3, 1)], dim=1)
    p = BasicProjector(11, 4, 0, "normal", "cpu")
    assert torch.equal(p.project(feats, 0), p.project(flat, 0))
    with pytest.raises(ShapeError):
        p.project(torch.zeros(3, 12), 0)
    half = BasicProjector(11, 4, 0, "normal", "cpu", dtype=torch.float16)
    out = half.project(flat.half(), 0)
    assert out.dtype == torch.float16
    ref = make_projector(11, 4, 0, "gaussian").project(flat.half().float())
    assert torch.equal(out, ref.half())
    assert isinstance(CudaProjector(11, 4, 0, "normal", torch.device("cpu")), BasicProjector)


def test_chunked_projector_sums_chunk_projections():
    x = _x(d=30)
    parts = [
        BasicProjector(d, 6, s, "rademacher", "cpu", dtype=torch.float64)
        for d, s in ((10, 1), (20, 2))
    ]
    chunked = ChunkedCudaProjector(parts, 20, [10, 20], 6, "cpu", torch.float64)
    ref = parts[0].project(x[:, :10], 0) + parts[1].project(x[:, 10:], 0)
    torch.testing.assert_close(chunked.project(x, 0), ref, rtol=0, atol=1e-12)
    feats = {"a": x[:, :4], "b": x[:, 4:]}
    torch.testing.assert_close(chunked.dict_project(feats, 0), ref, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="only accepts Tensor inputs"):
        chunked.project(feats, 0)
    with pytest.raises(ShapeError):
        chunked.project(x[:, :29], 0)


def test_make_random_projector_and_random_project_on_cpu():
    p = make_random_projector(
        [30, 10],
        6,
        8,
        16,
        torch.device("cpu"),
        proj_seed=5,
        proj_type="normal",
        dtype=torch.float64,
    )
    assert isinstance(p, BasicProjector) and p.feature_dim == 40
    x = _x()
    feats = {"a": x[:, :30], "b": x[:, 30:]}
    f = random_project(feats, 6, 8, 16, proj_seed=5, proj_type="normal")
    assert torch.equal(f(feats), p.project(x, 0))
    assert torch.equal(f(feats, ensemble_id=1), p.project(x, 1))
    ft = random_project(x.float(), 6, 8, 16, proj_type="sjlt")
    assert ft(x.float()).shape == (6, 8) and ft(x.float()).dtype == torch.float32


def _sin_hessian_setup(d, seed):
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def target(v):
        return torch.sin(v).sum()

    return x, target


def test_arnoldi_projector_inner_products_equal_inverse_hessian():
    x, target = _sin_hessian_setup(6, 0)
    reg = 1.5  # H = diag(-sin x) + reg I is positive definite
    p = ArnoldiProjector(6, 6, target, x, regularization=reg, mode="rev-rev")
    g = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = torch.randn(5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hess = torch.diag(reg - torch.sin(x))  # closed form
    oracle = g @ torch.linalg.solve(hess, h.T)
    torch.testing.assert_close(p.project(g) @ p.project(h).T, oracle, rtol=1e-9, atol=1e-10)
    assert p.eigvecs.shape == (6, 6) and p.eigvals.shape == (6,)
    f = arnoldi_project(6, target, x, proj_dim=3, regularization=reg, mode="rev-rev")
    assert f(g).shape == (4, 3)


def _indefinite(evals, seed=0):
    """A symmetric float64 matrix with the given eigenvalues and a random orthogonal basis."""
    d = len(evals)
    q, _ = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q @ torch.diag(torch.tensor(evals, dtype=torch.float64)) @ q.T


def test_arnoldi_projector_zero_columns_beyond_the_positive_eigenvalues(caplog):
    # dominant |λ|: 5, -4, 3, -2 -> two positive directions, two zero columns
    a = _indefinite([5.0, -4.0, 3.0, -2.0, 1.0, 0.5])
    x0 = torch.zeros(6, dtype=torch.float64)
    p = ArnoldiProjector(6, 4, lambda v: 0.5 * v @ a @ v, x0, mode="rev-rev", max_iter=6)
    g = torch.randn(7, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with caplog.at_level("WARNING", logger="tdabench.func._projectors_compat"):
        pg = p.project(g)
    assert "2 of the 4 requested directions are zero columns" in caplog.text
    assert "2 of the dominant eigenvalues are not positive" in caplog.text
    assert pg.shape == (7, 4) and p.proj_dim == 4 and torch.isfinite(pg).all()
    assert (pg[:, 2:] == 0).all()
    # oracle: the dense eigendecomposition's positive dominant part, g U diag(1/λ) U^T h^T
    evals, evecs = torch.linalg.eigh(a)
    pos = torch.tensor([5.0, 3.0], dtype=torch.float64)
    u = evecs[:, [int((evals - v).abs().argmin()) for v in pos]]
    torch.testing.assert_close(p.eigvals, pos, rtol=1e-10, atol=1e-12)
    oracle = g @ u @ torch.diag(1 / pos) @ u.T @ h.T
    torch.testing.assert_close(pg @ p.project(h).T, oracle, rtol=1e-9, atol=1e-11)
    # each nonzero column is ± the oracle's column (eigenvectors have no sign)
    cols = g @ u / pos.sqrt()
    torch.testing.assert_close(pg[:, :2].abs(), cols.abs(), rtol=1e-9, atol=1e-11)


def test_arnoldi_project_keeps_the_requested_shape_and_no_warning_when_definite(caplog):
    x = torch.tensor([1.0, 2.0, -1.0, -2.0], dtype=torch.float64)  # -sin x: two of each sign
    f = arnoldi_project(4, lambda v: torch.sin(v).sum(), x, proj_dim=3, mode="rev-rev")
    out = f(torch.eye(4, dtype=torch.float64))
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    caplog.clear()
    a = _indefinite([4.0, 3.0, 2.0, 1.0], seed=3)
    p = ArnoldiProjector(4, 4, lambda v: 0.5 * v @ a @ v, torch.zeros(4, dtype=torch.float64))
    with caplog.at_level("WARNING", logger="tdabench.func._projectors_compat"):
        pe = p.project(torch.eye(4, dtype=torch.float64))
    assert "zero columns" not in caplog.text
    torch.testing.assert_close(pe @ pe.T, torch.linalg.inv(a), rtol=1e-9, atol=1e-11)
