"""Oracle tests for the benchmark helpers (benchmarks/common.py): file format, LDS, training loop."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common

safetensors_torch = pytest.importorskip("safetensors.torch")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.arange(5),
        "c": torch.tensor([True, False]),
        "d": torch.randn(2, dtype=torch.float64, generator=g),
        "e": torch.zeros(0, 3),
        "u": torch.arange(4, dtype=torch.uint8),
    }


def test_safetensors_writer_is_read_by_the_library(tmp_path: Path) -> None:
    t = _tensors()
    common.write_safetensors(t, tmp_path / "x.safetensors", {"k": "v"})
    back = safetensors_torch.load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k])


def test_safetensors_reader_reads_library_files(tmp_path: Path) -> None:
    t = _tensors()
    safetensors_torch.save_file(t, str(tmp_path / "y.safetensors"), metadata={"k": "v"})
    back, meta = common.read_safetensors(tmp_path / "y.safetensors")
    assert meta == {"k": "v"}
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k])


def test_lds_matches_scipy_loop() -> None:
    g = torch.Generator().manual_seed(1)
    n_train, n_test, S, k = 40, 6, 15, 20
    score = torch.randn(n_train, n_test, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(n_train, generator=g)[:k] for _ in range(S)])
    values = torch.randn(S, n_test, generator=g, dtype=torch.float64)
    values[:, 2] = 1.0  # constant column -> NaN, dropped
    pred = torch.stack([score[i].sum(0) for i in idx])
    expected = [
        spearmanr(pred[:, j].numpy(), values[:, j].numpy())[0] for j in range(n_test) if j != 2
    ]
    got, _ = common.lds(score, values, idx)
    assert got == pytest.approx(float(np.mean(expected)), abs=1e-12)
    # sanity: a score that is exactly the target's linear model gives LDS 1
    w = torch.randn(n_train, n_test, generator=g, dtype=torch.float64)
    perfect = torch.stack([w[i].sum(0) for i in idx])
    assert common.lds(w, perfect, idx)[0] == pytest.approx(1.0)


def test_column_agreement() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(30, 4, generator=g)
    assert common.column_agreement(a, 3 * a + 1) == pytest.approx(1.0, abs=1e-6)
    assert common.column_agreement(a, -a) == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("name", ["lr", "mlp"])
def test_train_many_equals_plain_loop(name: str) -> None:
    """Stacked (bmm) training of several models equals torch.optim.SGD run per model."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(60, 784, generator=g), torch.randint(0, 10, (60,), generator=g)
    recipe = {**common.RECIPES[name], "epochs": 2, "batch_size": 16, "dropout": 0.0}
    subsets = [torch.randperm(60, generator=g)[:40] for _ in range(3)]
    seeds = [5, 6, 7]
    states, saved = common.train_many(name, x, y, subsets, seeds, recipe, save_epochs=[1])
    for sub, seed, st in zip(subsets, seeds, states, strict=True):
        torch.manual_seed(seed)
        m = common.build_model(name)
        opt = torch.optim.SGD(m.parameters(), lr=recipe["lr"], momentum=recipe["momentum"])
        gen = torch.Generator().manual_seed(seed + 7919)
        for _ in range(2):
            order = sub[torch.randperm(40, generator=gen)]
            for i in range(0, 40, 16):
                b = order[i : i + 16]
                opt.zero_grad()
                F.cross_entropy(m(x[b]), y[b]).backward()
                opt.step()
        for k, v in m.state_dict().items():
            torch.testing.assert_close(st[k], v, rtol=1e-5, atol=1e-6)
    assert len(saved[1]) == 3


def test_loss_functions_work_batched_and_unbatched() -> None:
    torch.manual_seed(0)
    model = common.build_model("mlp")
    params = dict(model.named_parameters())
    x, y = torch.rand(5, 784), torch.randint(0, 10, (5,))
    for make in (common.make_loss_func, common.make_margin_func, common.make_prob_func):
        f = make(model)
        batched = f(params, (x, y))
        single = torch.stack([f(params, (x[i], y[i])) for i in range(5)]).mean()
        torch.testing.assert_close(batched, single)
    # margin = log p - log(1 - p) of the correct class; prob = p
    p = torch.softmax(model(x), 1)[torch.arange(5), y]
    torch.testing.assert_close(
        common.make_margin_func(model)(params, (x, y)), (p.log() - (1 - p).log()).mean()
    )
    ev = common.evaluate("mlp", model.state_dict(), x, y)
    logits = model(x)
    others = torch.stack(
        [
            torch.logsumexp(torch.cat([logits[i, : y[i]], logits[i, y[i] + 1 :]]), 0)
            for i in range(5)
        ]
    )
    torch.testing.assert_close(ev["margin"], logits[torch.arange(5), y] - others)


def test_memory_bound_is_issue_6s_formula() -> None:
    """2 x (float32 score matrix + model + largest loader batch x differentiated parameters)."""
    mb = 2**20
    lr = 784 * 10 + 10
    mlp = 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    last = 64 * 10 + 10
    scores = 4500 * 500
    assert common.memory_bound_mb("lr", "grad_dot") == 2 * 4 * (scores + lr + 500 * lr) / mb
    assert common.memory_bound_mb("lr", "if_cg") == 2 * 4 * (scores + lr + 4500 * lr) / mb
    assert common.memory_bound_mb("mlp", "if_cg") == 2 * 4 * (scores + mlp + 4500 * last) / mb
    assert common.memory_bound_mb("mlp", "rps") == 2 * 4 * (scores + mlp + 4500 * last) / mb
    assert (
        common.memory_bound_mb("mlp", "trak_10_sparse") == 2 * 4 * (scores + mlp + 500 * mlp) / mb
    )
