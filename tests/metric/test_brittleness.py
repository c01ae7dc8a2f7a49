"""Brittleness against brute-force retraining over every k, and the batched runner against it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdabench.errors import ConfigError, KeyMismatchError, NonFiniteError, ShapeError
from tdabench.groundtruth.toy import ToySoftmaxTrainer, make_toy_data
from tdabench.metric import BrittlenessRunner, brittleness
from tdabench.metric.brittleness import removal_order

SEED = 11


class Counting(ToySoftmaxTrainer):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def train(self, masks, seeds):
        self.calls.append(len(seeds))
        return super().train(masks, seeds)


@pytest.fixture(scope="module")
def setup():
    (x, y), (xt, yt) = make_toy_data(n_train=16, n_test=4, dim=2, num_classes=2, seed=3, noise=2.0)
    return Counting((x, y), (xt, yt), 2, epochs=3, batch_size=4), x, y, xt, yt


def _predict(state, batch):
    x, y = batch
    return ((x @ state["weight"].T + state["bias"]).argmax(-1) == y).to(torch.float64)


def _funcs(trainer, x):
    def train_func(loader):
        mask = torch.zeros(len(x), dtype=torch.bool)
        for xb, _ in loader:  # which samples the loader holds (by value: inputs are distinct)
            for row in xb:
                mask[(x == row).all(dim=1)] = True
        w, b = trainer._train_one(mask, SEED)
        lin = nn.Linear(x.shape[1], 2).double()
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        return lin

    def eval_func(model, test_loader):
        ((xb, _),) = list(test_loader)
        return model(xb).argmax(-1)

    return train_func, eval_func


def _brute_force(trainer, scores_j, j, yt):
    """First k in 0..n whose model, trained without the top k, mispredicts test j."""
    order = removal_order(scores_j)
    for k in range(len(order) + 1):
        mask = torch.ones(len(order), dtype=torch.bool)
        mask[torch.from_numpy(order[:k])] = False
        w, b = trainer._train_one(mask, SEED)
        if int((trainer.xt[j] @ w.T + b).argmax()) != int(yt[j]):
            return k
    return None


def test_matches_brute_force_over_every_k(setup):
    trainer, x, y, xt, yt = setup
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))  # a sampler order: score position i is dataset index perm[i]
    train_loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=_Sub(perm))
    train_func, eval_func = _funcs(trainer, x)
    found = 0
    for j in range(len(yt)):
        s_pos = rng.normal(size=len(y))
        s_data = np.empty_like(s_pos)
        s_data[perm] = s_pos  # the same scores indexed by dataset index, for the oracle
        want = _brute_force(trainer, s_data, j, yt)
        test = DataLoader(TensorDataset(xt[j : j + 1], yt[j : j + 1]))
        got = brittleness(
            train_loader,
            test,
            torch.tensor(s_pos),
            train_func,
            eval_func,
            search_space=range(len(y) + 1),
        )
        assert got == want
        found += want is not None
        coarse = [0, 3, 7, 12]
        got_c = brittleness(
            train_loader,
            test,
            torch.tensor(s_pos)[:, None],
            train_func,
            eval_func,
            search_space=coarse,
        )
        flips = [k for k in coarse if _flips(trainer, s_data, j, yt, k)]
        assert got_c == (flips[0] if flips else None)
    assert found >= 2  # the problem is not trivial


def _flips(trainer, s, j, yt, k):
    order = removal_order(s)
    mask = torch.ones(len(order), dtype=torch.bool)
    mask[torch.from_numpy(order[:k])] = False
    w, b = trainer._train_one(mask, SEED)
    return int((trainer.xt[j] @ w.T + b).argmax()) != int(yt[j])


class _Sub(torch.utils.data.Sampler):
    def __init__(self, indices):
        self.indices = [int(i) for i in indices]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def test_runner_equals_one_at_a_time_and_resumes(setup, tmp_path):
    trainer, _, y, _, yt = setup
    rng = np.random.default_rng(1)
    tests = [0, 2, 3]
    scores = rng.normal(size=(len(y), len(tests)))
    ks = [0, 2, 5, 9, 14]
    run = BrittlenessRunner(
        trainer, _predict, tmp_path / "b", search_space=ks, seed=SEED, shard_size=4
    )
    trainer.calls.clear()
    out = run.run(torch.tensor(scores), tests)
    assert trainer.calls == [3, 3, 3, 3, 3]  # one batched call per k (equal subset sizes)
    for c, j in enumerate(tests):
        flips = [k for k in ks if _flips(trainer, scores[:, c], j, yt, k)]
        assert out["brittleness"][c] == (flips[0] if flips else None)
    # resume: nothing to train; a deleted and a corrupted shard are recomputed, same answer
    trainer.calls.clear()
    assert run.run(scores, tests) == out and trainer.calls == []
    shards = sorted((tmp_path / "b" / "shards").glob("*.parquet"))
    shards[1].unlink()
    shards[2].write_bytes(shards[2].read_bytes()[:200])  # truncated
    assert run.run(scores, tests) == out and trainer.calls == [3, 3]
    with pytest.raises(KeyMismatchError):
        run.run(scores + 1.0, tests)
    small = BrittlenessRunner(
        trainer, _predict, tmp_path / "c", search_space=ks, seed=SEED, shard_size=2
    )
    assert small.run(scores, tests)["brittleness"] == out["brittleness"]


def test_bad_inputs(setup, tmp_path):
    trainer, x, y, xt, yt = setup
    train_func, eval_func = _funcs(trainer, x)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    one = DataLoader(TensorDataset(xt[:1], yt[:1]))
    with pytest.raises(ShapeError):
        brittleness(
            loader,
            DataLoader(TensorDataset(xt[:2], yt[:2])),
            torch.zeros(len(y)),
            train_func,
            eval_func,
        )
    with pytest.raises(ShapeError):
        brittleness(loader, one, torch.zeros(len(y), 2), train_func, eval_func)
    with pytest.raises(ConfigError):
        brittleness(loader, one, torch.zeros(len(y)), train_func, eval_func, search_space=[5, 2])
    with pytest.raises(ConfigError):
        brittleness(loader, one, torch.zeros(len(y)), train_func, eval_func, search_space=[0, 99])
    bad = torch.zeros(len(y))
    bad[3] = float("nan")
    with pytest.raises(NonFiniteError):
        brittleness(loader, one, bad, train_func, eval_func, search_space=[0])
    assert removal_order(np.array([1.0, 3.0, 3.0, 0.0])).tolist() == [1, 2, 0, 3]
