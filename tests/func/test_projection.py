"""Random projection: determinism under any memory budget, JL, moments, budget, errors."""

from __future__ import annotations

import math

import pytest
import torch

from tdabench.errors import ConfigError, MemoryLimitError, ShapeError
from tdabench.func.projection import (
    Projector,
    default_block_rows,
    make_projector,
    planned_chunk_bytes,
    projector_from_kwargs,
    resolve_projector_kwargs,
)
from tdabench.memory import MemoryPlanner

D, K, ROWS = 203, 16, 10  # d not a multiple of the block size on purpose


def _proj(**kw):
    args = {"feature_dim": D, "proj_dim": K, "seed": 7, "dtype": torch.float64, "block_rows": ROWS}
    args.update(kw)
    return make_projector(**args)


@pytest.mark.parametrize("proj_type", ["gaussian", "rademacher"])
def test_identical_whatever_the_budget(proj_type):
    x = torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = _proj(proj_type=proj_type)
    assert full.chunk_rows == D  # whole matrix fits the default budget: kept
    ref_matrix = full.matrix()
    ref = full.project(x)
    torch.testing.assert_close(ref, x @ ref_matrix, rtol=1e-13, atol=1e-13)
    block = ROWS * K * 8
    for budget in [
        2 * block,
        3 * block + 5,
        7 * block,
        19 * block,
    ]:  # 1, 2, 6 and 18 blocks per chunk
        p = _proj(proj_type=proj_type, max_chunk_bytes=budget)
        assert p.chunk_rows < D and p.chunk_rows % ROWS == 0
        # the matrix itself is bit-identical: rebuild it from the chunks
        pieces = torch.cat([c for _, _, c in p._chunks()])
        assert torch.equal(pieces, ref_matrix)
        torch.testing.assert_close(p.project(x), ref, rtol=1e-12, atol=1e-12)
        assert p.cached_matrix_bytes == 0


def test_same_seed_same_matrix_other_seed_other_matrix():
    a, b = _proj(), _proj()
    assert torch.equal(a.matrix(), b.matrix())
    c = _proj(seed=8)
    assert not torch.allclose(a.matrix(), c.matrix())
    # different blocks of one matrix are not copies of each other
    m = a.matrix()
    assert not torch.allclose(m[:ROWS], m[ROWS : 2 * ROWS])
    # a repeated project() call reuses the cached matrix and gives the same result
    x = torch.randn(3, D, dtype=torch.float64)
    assert torch.equal(a.project(x), a.project(x))


def test_float32_and_float64_agree():
    m64 = _proj().matrix()
    m32 = _proj(dtype=torch.float32).matrix()
    assert m32.dtype == torch.float32
    torch.testing.assert_close(m32.double(), m64, rtol=1e-6, atol=1e-7)


def test_jl_norm_and_inner_product_preserved_on_average():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, D, dtype=torch.float64, generator=g)
    for proj_type in ["gaussian", "rademacher", "sparse"]:
        ratios, inner = [], []
        for seed in range(200):
            y = _proj(seed=seed, proj_type=proj_type).project(x)
            ratios.append(float(y[0].norm() ** 2 / x[0].norm() ** 2))
            inner.append(float(y[0] @ y[1]))
        r = torch.tensor(ratios)
        # E = 1, Var = 2/k for Gaussian: the mean of 200 has sd 0.025
        assert abs(float(r.mean()) - 1.0) < 0.1, proj_type
        assert 0.5 < float(r.var()) / (2.0 / K) < 1.6, proj_type
        sd = math.sqrt(
            (float(x[0].norm() ** 2 * x[1].norm() ** 2) + float(x[0] @ x[1]) ** 2) / K / 200
        )
        assert abs(sum(inner) / 200 - float(x[0] @ x[1])) < 4 * sd, proj_type


def test_distribution_moments():
    k = 64
    m = make_projector(2000, k, seed=3, dtype=torch.float64).matrix()
    n = m.numel()
    assert abs(float(m.mean())) < 4 * math.sqrt(1.0 / k / n)
    assert float(m.var()) * k == pytest.approx(1.0, abs=0.02)
    kurt = float((m**4).mean() / m.var() ** 2)
    assert kurt == pytest.approx(3.0, abs=0.1)
    r = make_projector(2000, k, seed=3, proj_type="rademacher", dtype=torch.float64).matrix()
    assert torch.allclose(r.abs(), torch.full_like(r, 1.0 / math.sqrt(k)))
    frac = float((r > 0).double().mean())
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / n)


def test_memory_budget_respected(monkeypatch):
    drawn_rows: list[int] = []
    orig = Projector._draw_block

    def spy(self, block, rows):
        drawn_rows.append(rows)
        return orig(self, block, rows)

    monkeypatch.setattr(Projector, "_draw_block", spy)
    x = torch.randn(4, D, dtype=torch.float64)
    for budget in [2 * ROWS * K * 8, 5 * ROWS * K * 8 + 100, 10**9]:
        drawn_rows.clear()
        p = _proj(max_chunk_bytes=budget)
        p.project(x)
        p.project(x)
        assert 0 < p.peak_chunk_bytes <= budget
        assert max(drawn_rows) <= ROWS
        cached = p.chunk_rows >= D
        # the matrix is kept only if it fits; otherwise it is regenerated every call
        assert len(drawn_rows) == math.ceil(D / ROWS) * (1 if cached else 2)
        assert p.cached_matrix_bytes == (D * K * 8 if cached else 0)
    # default block size keeps one block about 2 MiB in float64
    assert default_block_rows(512) * 512 * 8 == 2 * 2**20
    big = make_projector(10**6, 512, dtype=torch.float32, memory_budget="4GiB")
    # planned: four streaming pieces (64 MiB each on one CPU thread) = today's 256 MiB
    planned = planned_chunk_bytes(MemoryPlanner(torch.device("cpu"), 4 * 2**30, threads=1))
    assert planned == 256 * 2**20 and big.max_chunk_bytes == planned
    assert big.chunk_rows * 512 * 4 + big.block_rows * 512 * 8 <= planned
    assert big.chunk_rows < 10**6
    # a tiny budget still holds one block (the smallest unit), and draws the same matrix
    tiny = make_projector(3000, 16, seed=3, dtype=torch.float64, memory_budget=1, block_rows=100)
    whole = make_projector(
        3000, 16, seed=3, dtype=torch.float64, max_chunk_bytes=10**8, block_rows=100
    )
    assert tiny.chunk_rows == 100
    x = torch.randn(4, 3000, dtype=torch.float64)
    torch.testing.assert_close(tiny.project(x), whole.project(x), rtol=1e-12, atol=1e-12)


def test_identity():
    x = torch.randn(3, D, dtype=torch.float64)
    p = make_projector(D, None, proj_type="identity", dtype=torch.float64)
    assert p.proj_dim == D
    assert torch.equal(p.project(x), x)
    assert torch.equal(p.matrix(), torch.eye(D, dtype=torch.float64))
    assert make_projector(D, D, proj_type="identity").proj_dim == D


def test_config_errors():
    with pytest.raises(ConfigError, match="max_chunk_bytes"):
        _proj(max_chunk_bytes=ROWS * K * 8)  # one block + its scratch does not fit
    with pytest.raises(ConfigError, match="proj_type"):
        _proj(proj_type="countsketch")
    with pytest.raises(ConfigError, match="proj_dim"):
        _proj(proj_dim=None)
    with pytest.raises(ConfigError, match="proj_dim"):
        _proj(proj_dim=0)
    with pytest.raises(ConfigError, match="identity"):
        make_projector(D, 5, proj_type="identity")
    with pytest.raises(ConfigError, match="seed"):
        _proj(seed=-1)
    with pytest.raises(ConfigError, match="dtype"):
        _proj(dtype=torch.int64)
    with pytest.raises(MemoryLimitError):
        _proj(max_chunk_bytes=3 * ROWS * K * 8).matrix()
    with pytest.raises(ShapeError):
        _proj().project(torch.zeros(3, D + 1, dtype=torch.float64))
    with pytest.raises(ShapeError):
        _proj().project(torch.zeros(D, dtype=torch.float64))


def test_resolve_projector_kwargs():
    assert resolve_projector_kwargs(None) is None
    given = {"proj_dim": 8}
    defaults = {"proj_dim": 512, "proj_type": "rademacher"}
    out = resolve_projector_kwargs(given, defaults)
    assert out == {
        "proj_dim": 8,
        "proj_type": "rademacher",
        "seed": 0,
        "max_chunk_bytes": None,  # planned from the memory budget
        "precision": "highest",
    }
    out["seed"] = 99  # the result is a fresh dict: nothing leaks into inputs or later calls
    assert given == {"proj_dim": 8} and defaults == {"proj_dim": 512, "proj_type": "rademacher"}
    assert resolve_projector_kwargs({}, {"proj_dim": 4})["seed"] == 0
    assert resolve_projector_kwargs({"proj_type": "identity"})["proj_dim"] is None
    with pytest.raises(ConfigError, match="unknown projector_kwargs"):
        resolve_projector_kwargs({"proj_dim": 8, "proj_size": 32})
    with pytest.raises(ConfigError):
        resolve_projector_kwargs({"proj_type": "fast_jl"})
    with pytest.raises(ConfigError):
        resolve_projector_kwargs({"seed": 1.5})
    with pytest.raises(ConfigError):
        resolve_projector_kwargs([("proj_dim", 8)])
    r = resolve_projector_kwargs({"proj_dim": K, "seed": 3})
    p = projector_from_kwargs(r, D, seed_offset=2, dtype=torch.float64)
    assert p.seed == 5 and p.proj_dim == K


def test_sparse_matches_its_dense_matrix_under_any_budget():
    """The CountSketch projection equals ``x @ P`` for its dense ``P`` (the oracle), whatever the
    budget, the dtype or the column blocking; ``P`` has exactly one ``±1`` per row."""
    x = torch.randn(6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    full = _proj(proj_type="sparse")
    m = full.matrix()
    assert torch.equal(m.abs().sum(1), torch.ones(D, dtype=torch.float64))
    assert torch.equal((m != 0).sum(1), torch.ones(D, dtype=torch.int64))
    ref = x @ m
    torch.testing.assert_close(full.project(x), ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(
        full.project([x[:, :17], x[:, 17:150], x[:, 150:]]), ref, rtol=1e-13, atol=1e-13
    )
    assert full.cached_matrix_bytes == D * 8  # int64 codes, not a dense matrix
    for budget in [ROWS * 8, 3 * ROWS * 8 + 5, 11 * ROWS * 8]:
        p = _proj(proj_type="sparse", max_chunk_bytes=budget)
        assert p.chunk_rows < D and p.chunk_rows % ROWS == 0
        torch.testing.assert_close(p.project(x), ref, rtol=1e-12, atol=1e-12)
        assert 0 < p.peak_chunk_bytes <= budget and p.cached_matrix_bytes == 0
        with pytest.raises(MemoryLimitError):
            p.matrix()
    m32 = _proj(proj_type="sparse", dtype=torch.float32).matrix()
    assert torch.equal(m32.double(), m)  # integer draws: the same matrix in every dtype
    assert not torch.equal(_proj(proj_type="sparse", seed=8).matrix(), m)
    # all-zero input, empty batch
    assert torch.equal(
        full.project(torch.zeros(2, D, dtype=torch.float64)), torch.zeros(2, K, dtype=torch.float64)
    )
    assert full.project(torch.zeros(0, D, dtype=torch.float64)).shape == (0, K)


def test_sparse_buckets_and_signs_uniform():
    k, d = 32, 64000
    m = make_projector(d, k, seed=5, proj_type="sparse", dtype=torch.float64).matrix()
    counts = (m != 0).sum(0).double()  # rows per bucket: multinomial(d, 1/k)
    chi2 = float(((counts - d / k) ** 2 / (d / k)).sum())
    assert chi2 < 70  # chi-square with 31 dof: P(> 70) < 1e-4
    frac = float((m > 0).sum()) / d
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / d)
    # E[P P^T] = I: off-diagonal inner products of rows average to zero
    g = m[:2000] @ m[:2000].T
    assert torch.equal(torch.diagonal(g), torch.ones(2000, dtype=torch.float64))
    off = g - torch.eye(2000, dtype=torch.float64)
    assert abs(float(off.sum())) / (2000 * 1999) < 4 * math.sqrt(1 / k / (2000 * 1999 / 2))


@pytest.mark.gpu
def test_cuda_deterministic_across_budgets():
    x = torch.randn(5, D, dtype=torch.float64, device="cuda")
    ref = _proj(device="cuda").project(x)
    again = _proj(device="cuda", max_chunk_bytes=3 * ROWS * K * 8).project(x)
    torch.testing.assert_close(again, ref, rtol=1e-12, atol=1e-12)
    m = _proj(device="cuda").matrix()
    assert float(m.var()) * K == pytest.approx(1.0, abs=0.15)
    sp = _proj(device="cuda", proj_type="sparse")
    torch.testing.assert_close(sp.project(x), x @ sp.matrix(), rtol=1e-12, atol=1e-12)


def test_dattri_projector_key_aliases():
    from tdabench.errors import ConfigError
    from tdabench.func.projection import resolve_projector_kwargs

    r = resolve_projector_kwargs(
        {"proj_dim": 8, "proj_seed": 3, "proj_max_batch_size": 32, "device": "cpu"}
    )
    assert r["seed"] == 3 and r["proj_dim"] == 8
    with pytest.raises(ConfigError, match="pass one"):
        resolve_projector_kwargs({"seed": 1, "proj_seed": 2})
