"""KNN-Shapley against brute-force Shapley values over all permutations (n <= 8)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import KNNShapleyAttributor
from tdabench.algorithm.data_shapley import KNNShapleyArguments, knn_shapley_values
from tdabench.errors import ConfigError, ShapeError


def _utility(subset: list[int], dist: np.ndarray, y_train: np.ndarray, y: int, k: int) -> float:
    """KNN accuracy of ``subset`` on one test point (Jia et al.): mean label match of its K nearest."""
    near = sorted(subset, key=lambda i: (dist[i], i))[:k]
    return sum(float(y_train[i] == y) for i in near) / k


def _brute_force(dist: np.ndarray, y_train: np.ndarray, y: int, k: int) -> np.ndarray:
    """Average marginal contribution over all n! orderings."""
    n = dist.size
    phi = np.zeros(n)
    for perm in itertools.permutations(range(n)):
        prev, members = 0.0, []
        for i in perm:
            members.append(i)
            cur = _utility(members, dist, y_train, y, k)
            phi[i] += cur - prev
            prev = cur
    return phi / math.factorial(n)


@pytest.mark.parametrize(("n", "k", "seed"), [(5, 1, 0), (6, 2, 1), (7, 3, 2), (8, 3, 3)])
def test_matches_brute_force_shapley(n, k, seed):
    rng = np.random.default_rng(seed)
    n_test = 2 if n < 8 else 1
    dist = rng.random((n_test, n))
    y_train = rng.integers(0, 2, n)
    y_test = rng.integers(0, 2, n_test)
    got = knn_shapley_values(torch.tensor(dist), torch.tensor(y_train), torch.tensor(y_test), k)
    assert got.shape == (n_test, n) and got.dtype == torch.float64  # laid out like dist
    for j in range(n_test):
        want = _brute_force(dist[j], y_train, int(y_test[j]), k)
        np.testing.assert_allclose(got[j].numpy(), want, atol=1e-12)
        # efficiency: the values sum to the utility of the full set
        assert got[j].sum().item() == pytest.approx(
            _utility(list(range(n)), dist[j], y_train, int(y_test[j]), k), abs=1e-12
        )


def test_ties_broken_by_index_like_the_oracle():
    dist = np.array([0.5, 0.2, 0.5, 0.2, 0.9, 0.5])
    y_train = np.array([1, 0, 1, 1, 0, 0])
    got = knn_shapley_values(torch.tensor(dist[None]), torch.tensor(y_train), torch.tensor([1]), 2)
    np.testing.assert_allclose(got[0].numpy(), _brute_force(dist, y_train, 1, 2), atol=1e-12)


def _loaders(rng, n, m, d, bs):
    xtr, xte = torch.tensor(rng.normal(size=(n, d))), torch.tensor(rng.normal(size=(m, d)))
    ytr, yte = torch.tensor(rng.integers(0, 3, n)), torch.tensor(rng.integers(0, 3, m))
    return (
        DataLoader(TensorDataset(xtr, ytr), batch_size=bs),
        DataLoader(TensorDataset(xte, yte), batch_size=bs),
        xtr,
        xte,
        ytr,
        yte,
    )


def test_attributor_loaders_labels_and_self_attribute():
    rng = np.random.default_rng(4)
    tr, te, xtr, xte, ytr, yte = _loaders(rng, 13, 6, 4, 4)
    att = KNNShapleyAttributor(k_neighbors=3)
    att.cache(tr)
    got = att.attribute(tr, te)
    want = knn_shapley_values(torch.cdist(xte, xtr), ytr, yte, 3)
    assert got.shape == (6, 13)  # (n_test, n_train): dattri's layout, declared by the class
    assert KNNShapleyAttributor.score_layout == "test_train"
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # explicit labels (dattri's 3rd/4th arguments) override the batches' last element
    flipped = (ytr + 1) % 3
    torch.testing.assert_close(
        att.attribute(tr, te, flipped, yte),
        knn_shapley_values(torch.cdist(xte, xtr), flipped, yte, 3),
    )
    # a custom distance in dattri's (test_batch, train_batch) order
    manhattan = KNNShapleyAttributor(3, distance_func=lambda a, b: torch.cdist(a[0], b[0], p=1))
    torch.testing.assert_close(
        manhattan.attribute(tr, te), knn_shapley_values(torch.cdist(xte, xtr, p=1), ytr, yte, 3)
    )
    # self_attribute = diagonal of attribute(train, train), also when pieces are split by the planner
    full = att.attribute(tr, tr).diagonal()
    torch.testing.assert_close(att.self_attribute(tr), full)
    small = KNNShapleyAttributor(3, memory_budget=13 * 8 * 6 * 2)  # two test rows per piece
    torch.testing.assert_close(small.attribute(tr, te), got)
    torch.testing.assert_close(small.self_attribute(tr), full)


def test_task_embeds_with_the_last_linear_input():
    from tdabench.task import AttributionTask

    rng = np.random.default_rng(7)
    tr, te, xtr, xte, ytr, yte = _loaders(rng, 9, 4, 3, 4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    task = AttributionTask(lambda p, d: torch.zeros(()), model, model.state_dict())
    with torch.no_grad():
        htr, hte = model[1](model[0](xtr)), model[1](model[0](xte))
    got = KNNShapleyAttributor(2, task=task).attribute(tr, te)
    torch.testing.assert_close(got, knn_shapley_values(torch.cdist(hte, htr), ytr, yte, 2))
    first = KNNShapleyAttributor(2, task=task, layer_name="0").attribute(
        tr, te
    )  # the input layer: raw inputs
    torch.testing.assert_close(first, knn_shapley_values(torch.cdist(xte, xtr), ytr, yte, 2))
    with pytest.raises(ConfigError):
        KNNShapleyAttributor(2, task=task, layer_name="1")


def test_train_permutation_permutes_values():
    rng = np.random.default_rng(5)
    tr, te, xtr, _, ytr, _ = _loaders(rng, 11, 4, 3, 5)
    perm = torch.tensor(rng.permutation(11))
    tr_p = DataLoader(TensorDataset(xtr[perm], ytr[perm]), batch_size=3)
    att = KNNShapleyAttributor(k_neighbors=2)
    torch.testing.assert_close(att.attribute(tr_p, te), att.attribute(tr, te)[:, perm])


def test_square_case_is_laid_out_test_by_train_against_brute_force():
    # n_train == n_test: a transposed result would have the right shape, so check entries
    rng = np.random.default_rng(8)
    tr, te, xtr, xte, ytr, yte = _loaders(rng, 6, 6, 2, 4)
    got = KNNShapleyAttributor(2).attribute(tr, te)
    dist = torch.cdist(xte, xtr).numpy()
    for j in range(6):
        want = _brute_force(dist[j], ytr.numpy(), int(yte[j]), 2)
        np.testing.assert_allclose(got[j].numpy(), want, atol=1e-12)
    assert not torch.allclose(got, got.T)  # the check above distinguishes the layouts


def test_bad_arguments():
    with pytest.raises(ConfigError):
        KNNShapleyAttributor(0)
    with pytest.raises(ConfigError):
        KNNShapleyAttributor(2.5)
    with pytest.raises(ConfigError):
        KNNShapleyAttributor(3, task=object())
    with pytest.raises(ConfigError):
        KNNShapleyAttributor(3, layer_name="fc")
    assert KNNShapleyArguments(4).to_dict() == {"k_neighbors": 4, "memory_budget": None}
    rng = np.random.default_rng(6)
    tr, te, *_ = _loaders(rng, 5, 3, 2, 5)
    with pytest.raises(ShapeError):
        KNNShapleyAttributor(2).attribute(tr, te, train_labels=[0, 1])
    with pytest.raises(ShapeError):
        KNNShapleyAttributor(2, distance_func=lambda a, b: torch.zeros(1, 1)).attribute(tr, te)


def test_registered_arguments_round_trip():
    from tdabench.algorithm.arguments import arguments_for

    cls = arguments_for("KNNShapleyAttributor")
    args = cls.from_dict({"k_neighbors": 3})
    assert cls.from_dict(args.to_dict()) == args
    with pytest.raises(ConfigError, match="valid keys"):
        cls.from_dict({"k": 3})
    with pytest.raises(ConfigError):
        cls.from_dict({"k_neighbors": -1})


def test_pipeline_builds_it_from_its_config():
    from types import SimpleNamespace

    from tdabench.pipeline.stages.attributor import make_attributor
    from tdabench.task import AttributionTask

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    task = AttributionTask(lambda p, d: torch.zeros(()), model, model.state_dict())
    setting = SimpleNamespace(recipe={"lr": 0.1}, kind="classification", n_train=10)
    cfg = {"method": "KNNShapleyAttributor", "params": {"k_neighbors": 3}, "layer_name": None}
    att, resolved = make_attributor(cfg, task, model, setting, 1, "cpu")
    assert isinstance(att, KNNShapleyAttributor) and att.k_neighbors == 3 and att.task is task
    assert resolved["k_neighbors"] == 3
    with pytest.raises(ConfigError, match="valid keys"):
        make_attributor({**cfg, "params": {"k": 3}}, task, model, setting, 1, "cpu")


@pytest.mark.parametrize("n_test", [4, 9])
def test_pipeline_attribute_stage_stores_train_by_test(n_test):
    from types import SimpleNamespace

    from tdabench.pipeline.stages.attribute import _loaders as stage_loaders
    from tdabench.pipeline.stages.attribute import _run

    rng = np.random.default_rng(9)
    xtr, xte = torch.tensor(rng.normal(size=(9, 3))), torch.tensor(rng.normal(size=(n_test, 3)))
    ytr, yte = torch.tensor(rng.integers(0, 2, 9)), torch.tensor(rng.integers(0, 2, n_test))
    model = nn.Sequential(nn.Linear(3, 2)).double()
    setting = SimpleNamespace(
        recipe={"lr": 0.1}, kind="classification", n_train=9, build_model=lambda: model
    )
    data = SimpleNamespace(train=(xtr, ytr), test=(xte, yte))
    cfg = {"method": "KNNShapleyAttributor", "params": {"k_neighbors": 2}, "layer_name": "0"}
    cfg.update(target="loss", batch_size=4)
    loaders = stage_loaders(data, ytr, n_test, 4)
    scores, _, _ = _run(cfg, setting, [model.state_dict()], loaders, False, "cpu")
    want = knn_shapley_values(torch.cdist(xte, xtr), ytr, yte, 2).T  # (n_train, n_test)
    torch.testing.assert_close(scores, want, atol=1e-12, rtol=0)
    # a method with tdabench's layout passes through untransposed (same stage, same check)
    grad_dot = {"method": "GradDotAttributor", "params": {}, "layer_name": None}
    grad_dot.update(target="loss", batch_size=4)
    dots, _, _ = _run(grad_dot, setting, [model.state_dict()], loaders, False, "cpu")
    g = {}
    for name, xs, ys in (("train", xtr, ytr), ("test", xte, yte)):
        rows = []
        for x, y in zip(xs, ys, strict=True):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x[None]), y[None]).backward()
            rows.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]))
        g[name] = torch.stack(rows)
    torch.testing.assert_close(dots, g["train"] @ g["test"].T, rtol=1e-10, atol=1e-12)
