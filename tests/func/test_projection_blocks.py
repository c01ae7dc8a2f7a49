"""Projection fast paths against dense float64 oracles: the float32 Gaussian draw, column
blocks, skipped all-zero columns, and the per-attributor projector set."""

from __future__ import annotations

import math

import pytest
import torch

from tdabench.errors import ShapeError
from tdabench.func.projection import (
    ProjectorSet,
    make_projector,
    resolve_projector_kwargs,
)

D, K = 600, 12  # wide enough (>= 256 columns) for the zero-column check


def _x(b=9, d=D, seed=0):
    return torch.randn(b, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block_rows", [None, 7])
def test_gaussian_float64_matrix_is_the_exact_upcast_of_float32(block_rows):
    m64 = make_projector(D, K, seed=5, dtype=torch.float64, block_rows=block_rows).matrix()
    m32 = make_projector(D, K, seed=5, dtype=torch.float32, block_rows=block_rows).matrix()
    assert torch.equal(m64, m32.double())
    if block_rows is not None:  # chunked generation draws the same matrix
        small = make_projector(
            D, K, seed=5, dtype=torch.float64, block_rows=7, max_chunk_bytes=3 * 7 * K * 8
        )
        assert torch.equal(torch.cat([c for _, _, c in small._chunks()]), m64)


def test_gaussian_draw_is_standard_normal():
    k = 64
    z = make_projector(2000, k, seed=1, dtype=torch.float64).matrix().flatten() * math.sqrt(k)
    n = z.numel()
    # Kolmogorov-Smirnov distance to the N(0, 1) CDF (closed form via erf)
    zs = torch.sort(z).values
    cdf = 0.5 * (1 + torch.special.erf(zs / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())
    assert ks < 1.95 / math.sqrt(n)  # 0.1% level
    # tails are populated like a Gaussian's: E #{|z| > 4} = n * 6.33e-5 ~ 8
    tail = int((z.abs() > 4).sum())
    assert 1 <= tail <= 30
    # distinct blocks and distinct columns are uncorrelated
    m = z.reshape(2000, k)
    c = torch.corrcoef(m.T)
    off = c - torch.diag(torch.diagonal(c))
    assert float(off.abs().max()) < 5 / math.sqrt(2000)


@pytest.mark.parametrize("proj_type", ["gaussian", "rademacher"])
@pytest.mark.parametrize("budget", [None, 2 * 37 * K * 8, 5 * 37 * K * 8 + 3])
def test_column_blocks_match_the_dense_product(proj_type, budget):
    kw = {"seed": 3, "proj_type": proj_type, "dtype": torch.float64, "block_rows": 37}
    if budget is not None:
        kw["max_chunk_bytes"] = budget
    p = make_projector(D, K, **kw)
    ref = make_projector(D, K, seed=3, proj_type=proj_type, dtype=torch.float64, block_rows=37)
    x = _x()
    oracle = x @ ref.matrix()
    # block boundaries that do not line up with the 37-row generator blocks or the chunks
    for cuts in ([D], [5, 300, 295], [1, 1, 598], [299, 301]):
        blocks, start = [], 0
        for w in cuts:
            blocks.append(x[:, start : start + w])
            start += w
        torch.testing.assert_close(p.project(blocks), oracle, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.project(x), oracle, rtol=1e-12, atol=1e-12)


def test_blocks_must_cover_the_feature_dimension():
    p = make_projector(D, K, dtype=torch.float64)
    x = _x()
    with pytest.raises(ShapeError, match="column blocks"):
        p.project([x[:, :10], x[:, 10:-1]])
    with pytest.raises(ShapeError):
        p.project([x[:3, :10], x[:, 10:]])
    with pytest.raises(ShapeError):
        p.project([])


def _sparse_x(b=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, D, dtype=torch.float64, generator=g)
    zero = torch.rand(D, generator=g) < 0.4  # 40% of the columns zero in every row
    x[:, zero] = 0.0
    x[:, 7] = 0.0
    x[0, 7], x[1, 7] = 1.5, -1.5  # sums to exactly 0 but is not a zero column
    x[:, 8] = 0.0
    x[3, 8] = -0.0
    return x, zero


def test_zero_columns_are_skipped_exactly():
    x, zero = _sparse_x()
    p = make_projector(D, K, seed=2, dtype=torch.float64)
    oracle = x @ p.matrix()
    seen = []
    orig = p._compact

    def spy(a, b, key):
        out = orig(a, b, key)
        seen.append((a.shape[1], out[0].shape[1]))
        return out

    p._compact = spy
    torch.testing.assert_close(p.project(x), oracle, rtol=1e-12, atol=1e-12)
    # the zero columns (and the -0.0 one) were dropped, the cancelling column was kept
    assert seen == [(D, D - int(zero.sum()) - (0 if zero[8] else 1) + (1 if zero[7] else 0))]
    # blocks are compacted separately
    torch.testing.assert_close(p.project([x[:, :250], x[:, 250:]]), oracle, rtol=1e-12, atol=1e-12)
    # float32 features: same result as the float32 dense product up to rounding
    p32 = make_projector(D, K, seed=2, dtype=torch.float32)
    torch.testing.assert_close(
        p32.project(x.float()).double(), oracle, rtol=1e-5, atol=1e-5 * float(oracle.abs().max())
    )


def test_wide_blocks_are_multiplied_in_column_pieces(monkeypatch):
    """Column pieces bound the copies made by zero-column skipping; the product is unchanged and
    zero columns are still skipped piece by piece."""
    import tdabench.func.projection as projection

    x, _zero = _sparse_x()
    p = make_projector(D, K, seed=2, dtype=torch.float64)
    oracle = x @ p.matrix()
    monkeypatch.setattr(projection, "_PIECE_ENTRIES", 64 * x.shape[0])  # 64-column pieces
    monkeypatch.setattr(projection, "_COMPACT_MIN_COLS", 32)
    seen = []
    orig = p._compact

    def spy(a, b, key):
        out = orig(a, b, key)
        seen.append((key, a.shape[1], out[0].shape[1]))
        return out

    p._compact = spy
    torch.testing.assert_close(p.project(x), oracle, rtol=1e-12, atol=1e-12)
    assert [k for k, _, _ in seen] == list(range(0, D, 64))
    assert sum(w for _, w, _ in seen) == D
    assert sum(w - kept for _, w, kept in seen) > 0  # some zero columns were dropped
    torch.testing.assert_close(p.project([x[:, :100], x[:, 100:]]), oracle, rtol=1e-12, atol=1e-12)


def test_zero_column_skipping_keeps_nan_and_inf():
    x, _ = _sparse_x()
    x[2, 11] = float("nan")
    x[4, 12], x[5, 12] = float("inf"), float("-inf")
    x[6, 13] = float("inf")
    p = make_projector(D, K, seed=2, dtype=torch.float64)
    oracle = x @ p.matrix()
    torch.testing.assert_close(p.project(x), oracle, equal_nan=True)
    out = p.project(x)
    assert bool(torch.isnan(out[2]).all()) and bool(torch.isinf(out[[4, 5, 6]]).all())


def test_all_zero_and_empty_batches():
    p = make_projector(D, K, seed=2, dtype=torch.float64)
    zeros = torch.zeros(3, D, dtype=torch.float64)
    assert torch.equal(p.project(zeros), torch.zeros(3, K, dtype=torch.float64))
    assert p.project(torch.zeros(0, D, dtype=torch.float64)).shape == (0, K)


def test_dense_blocks_stop_being_checked():
    p = make_projector(D, K, seed=2, dtype=torch.float64)
    x = _x(seed=4)
    oracle = x @ p.matrix()
    for _ in range(6):
        torch.testing.assert_close(p.project(x), oracle, rtol=1e-12, atol=1e-12)
    assert p._compact_misses[0] >= 4  # no zero columns: checks stopped


def test_projector_set_reuses_matrices_within_its_budget():
    r = resolve_projector_kwargs({"proj_dim": K, "seed": 4})
    s = ProjectorSet(r, D, dtype=torch.float64)
    a0, a1 = s.get(0), s.get(1)
    assert s.get(0) is a0 and s.get(1) is a1
    assert s.retained_bytes == 2 * D * K * 8
    for k, a in enumerate((a0, a1)):
        fresh = make_projector(D, K, seed=4 + k, dtype=torch.float64)
        assert torch.equal(a.matrix(), fresh.matrix())
    # over the retention budget: built afresh each time, same matrix
    tight = ProjectorSet(r, D, dtype=torch.float64, max_retained_bytes=D * K * 8)
    b0, b1 = tight.get(0), tight.get(1)
    assert tight.get(0) is b0 and tight.get(1) is not b1
    assert torch.equal(tight.get(1).matrix(), a1.matrix())
    assert tight.retained_bytes <= D * K * 8
    # default budget: a quarter of max_chunk_bytes
    assert ProjectorSet(r, D).max_retained_bytes == (r["max_chunk_bytes"] or 256 * 2**20) // 4
    assert ProjectorSet(None, D).get(0) is None
    ident = ProjectorSet(resolve_projector_kwargs({"proj_type": "identity"}), D)
    assert ident.get(3).proj_type == "identity" and ident.retained_bytes == 0


def test_in_place_float32_draw_equals_the_block_draw():
    p32 = make_projector(D, K, seed=6, dtype=torch.float32, block_rows=50)
    blocks = [p32._draw_block(b, min(50, D - 50 * b)) for b in range(p32.num_blocks)]
    assert torch.equal(p32.matrix(), torch.cat(blocks))
