"""FactGraSS oracles: with identity stages it equals full-rank LoGra; the masked-and-sketched
projection equals its dense matrix applied to autograd gradients; the sparse stages' inner
products are unbiased (exactly, by enumeration, for the masks)."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_logra import _dense_scores, _layer_grads, _loaders, _problem
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import FactGraSSAttributor, LoGraAttributor
from tdabench.algorithm.factgrass import SparseLayerCompressor, mask_factor, random_mask
from tdabench.errors import ConfigError


@pytest.fixture(autouse=True)
def _float64_default():
    """float64 by default inside this module's tests only (restored after each test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("conv", [False, True])
def test_identity_stages_equal_full_rank_logra(conv):
    _, task, x, y = _problem(conv, seed=1)
    train, test = _loaders(x, y)
    # k' = sqrt(64 * 4) = 16 >= every factor; intermediates (<= 4 x 9) <= proj_dim: no masking, no sketch
    fg = FactGraSSAttributor(task, proj_dim=64, blowup_factor=4, damping=0.05)
    lg = LoGraAttributor(task, proj_dim=256, damping=0.05)
    fg.cache(train)
    lg.cache(train)
    assert all(c.idx_in is None and c.idx_out is None and c.sketch is None for c in fg.compressors)
    torch.testing.assert_close(
        fg.attribute(train, test), lg.attribute(train, test), rtol=1e-10, atol=1e-12
    )


def test_sparse_projection_equals_dense_matrix():
    model, task, x, y = _problem(seed=2)
    train, test = _loaders(x, y)
    # k' = sqrt(2 * 2) = 2: fc1 (4 out, 4 in') and fc2 (3 out, 4 in) masked to 2 x 2, sketched to 2
    att = FactGraSSAttributor(task, proj_dim=2, blowup_factor=2, damping=0.1, seed=7)
    att.cache(train)
    Gtr = _layer_grads(model, task.loss_func, x, y)
    Gte = _layer_grads(model, task.target_func, x[:5], y[:5])
    ptr, pte = {}, {}
    for comp, mod in zip(att.compressors, att.layer_names, strict=True):
        assert comp.sketch is not None and comp.idx_out is not None and comp.idx_in is not None
        S = comp.sketch.matrix()  # (4, 2): one ±1 per row
        assert torch.equal(S.abs().sum(dim=1), torch.ones(4)) and set(S.unique().tolist()) <= {
            -1.0,
            0.0,
            1.0,
        }
        d_out, d_in = Gtr[mod].shape[1:]
        scale = (d_out / 2) ** 0.5 * (d_in / 2) ** 0.5

        def sub(G, c=comp, s=scale):
            return G[:, c.idx_out][:, :, c.idx_in].flatten(1) * s

        ptr[mod], pte[mod] = sub(Gtr[mod]) @ S, sub(Gte[mod]) @ S
    torch.testing.assert_close(
        att.projected((x, y), "loss", 0),
        torch.cat([ptr[m] for m in att.layer_names], 1),
        rtol=1e-10,
        atol=1e-12,
    )
    torch.testing.assert_close(
        att.attribute(train, test), _dense_scores(ptr, pte, 0.1), rtol=1e-8, atol=1e-10
    )


def test_mask_inner_products_unbiased_by_enumeration():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, generator=g), torch.randn(6, generator=g)
    vals = [
        (mask_factor(x, torch.tensor(s), 6) * mask_factor(y, torch.tensor(s), 6)).sum()
        for s in itertools.combinations(range(6), 2)
    ]  # every mask of 2 of 6 coordinates
    torch.testing.assert_close(torch.stack(vals).mean(), x @ y, rtol=1e-12, atol=1e-12)
    idx = random_mask(6, 2, seed=3)
    assert idx.numel() == 2 and torch.equal(idx, idx.sort().values) and random_mask(2, 2, 0) is None


def test_sketch_inner_products_statistics():
    """CountSketch over 4000 seeds: mean of <Sx, Sy> within 4 standard errors of <x, y>, and the
    variance close to (|x|²|y|² + <x,y>² - 2 Σ x_j² y_j²) / k."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, generator=g), torch.randn(12, generator=g)
    k = 3
    vals = torch.stack(
        [
            (lambda c: (c.second_stage(x[None]) * c.second_stage(y[None])).sum())(
                SparseLayerCompressor(3, 4, 4, k, seed, torch.device("cpu"), torch.float64)
            )
            for seed in range(4000)
        ]
    )
    var = ((x @ x) * (y @ y) + (x @ y) ** 2 - 2 * (x**2 * y**2).sum()) / k
    assert abs(vals.mean() - x @ y) < 4 * (var / len(vals)).sqrt()
    assert 0.85 < vals.var() / var < 1.15


def test_factgrass_arguments():
    _, task, _, _ = _problem()
    with pytest.raises(ValueError, match=r"intermediate_dim .* must be a perfect square"):
        FactGraSSAttributor(task, proj_dim=100, blowup_factor=3)
    with pytest.raises(ConfigError, match="blowup_factor"):
        FactGraSSAttributor(task, proj_dim=16, blowup_factor=0)
    from tdabench.algorithm.arguments import arguments_for

    with pytest.raises(ConfigError, match="intermediate_dim"):
        arguments_for("FactGraSSAttributor").from_dict({"proj_dim": 100, "blowup_factor": 3})
    att = FactGraSSAttributor(task, proj_dim=36, blowup_factor=9)
    assert att.factor_dim == 18 and att.hyperparameters()["blowup_factor"] == 9
    train = DataLoader(TensorDataset(torch.randn(4, 3), torch.randint(0, 3, (4,))), batch_size=2)
    att.cache(train)
    assert att.layer_dims == [16, 12]  # fc1 4 x (3 + 1), fc2 3 x 4: no stage reduces them
