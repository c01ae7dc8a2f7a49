"""retrain_loo / retrain_lds and calculate_*_ground_truth (the notebook API)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdabench.errors import (
    ConfigError,
    KeyMismatchError,
    NonFiniteError,
    ShapeError,
    UnsafeFileError,
)
from tdabench.groundtruth import model_seed, sampling_key, subset_indices
from tdabench.metric import calculate_lds_ground_truth, calculate_loo_ground_truth, lds, loo_corr
from tdabench.model_util.retrain import (
    list_retrained,
    load_retrained_state,
    retrain_lds,
    retrain_loo,
)

N, D = 24, 3


@pytest.fixture(scope="module")
def loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(
        N, generator=g, dtype=torch.float64
    )
    xt = torch.randn(5, D, generator=g, dtype=torch.float64)
    yt = xt @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), DataLoader(
        TensorDataset(xt, yt), batch_size=5
    )


class Recorder:
    """train_func: a few SGD steps of a float64 linear model; records what it saw."""

    def __init__(self, out_dim=1, nan=False):
        self.seen: list[tuple[int, list[int]]] = []
        self.out_dim, self.nan = out_dim, nan

    def __call__(self, loader, seed, lr=0.1):
        model = nn.Linear(D, self.out_dim).double()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        rows = []
        for _ in range(3):
            for xb, yb in loader:
                rows.extend(xb[:, 0].tolist())
                opt.zero_grad()
                ((model(xb)[:, 0] - yb) ** 2).mean().backward()
                opt.step()
        if self.nan:
            with torch.no_grad():
                model.weight.fill_(float("nan"))
        self.seen.append((seed, rows))
        return model


def target_func(ckpt_path, loader):
    model = nn.Linear(D, 1).double()
    model.load_state_dict(load_retrained_state(ckpt_path))
    x, y = next(iter(loader))
    with torch.no_grad():
        return (model(x).squeeze(-1) - y) ** 2


def test_retrain_lds_subsets_seeds_resume_and_ground_truth(tmp_path, loaders):
    train, test = loaders
    f = Recorder()
    retrain_lds(f, train, tmp_path, num_subsets=4, subset_ratio=0.5, num_runs_per_subset=2, seed=7)
    manifest, models = list_retrained(tmp_path)
    assert [(i, r) for i, r, _ in models] == [(i, r) for i in range(4) for r in range(2)]
    skey = sampling_key("lds", 7, N, 0.5)
    assert manifest["sampling_key"] == skey
    # Each model saw exactly its subset (3 epochs) and got its derived seed.
    x0 = train.dataset.tensors[0][:, 0]
    for (seed, rows), (i, r, _) in zip(f.seen, models, strict=True):
        assert seed == model_seed(skey, i, r)
        expected = sorted(x0[torch.from_numpy(subset_indices(skey, i, N, 0.5))].tolist() * 3)
        assert sorted(rows) == expected
    # Resume: nothing is retrained.
    f2 = Recorder()
    retrain_lds(f2, train, tmp_path, num_subsets=4, subset_ratio=0.5, num_runs_per_subset=2, seed=7)
    assert f2.seen == []
    gt, subsets = calculate_lds_ground_truth(target_func, tmp_path, test)
    assert gt.shape == (4, 5) and subsets.shape == (4, 12)
    # Oracle: average of the per-run targets, negated.
    direct = torch.stack([target_func(p, test) for _, _, p in models]).reshape(4, 2, 5).mean(1)
    assert torch.allclose(gt, -direct, atol=0, rtol=0)
    pos, _ = calculate_lds_ground_truth(target_func, tmp_path, test, negate=False)
    assert torch.equal(pos, -gt)
    assert lds(torch.randn(N, 5, dtype=torch.float64), (gt, subsets))[0].shape == (5,)
    runs, _ = calculate_lds_ground_truth(target_func, tmp_path, test, return_runs=True)
    assert runs.shape == (4, 2, 5) and torch.allclose(runs.mean(1), gt, rtol=0, atol=1e-15)


def test_slices_reproduce_one_global_set(tmp_path, loaders):
    train, _ = loaders
    retrain_lds(Recorder(), train, tmp_path / "one", num_subsets=4, total_num_subsets=4, seed=1)
    retrain_lds(
        Recorder(), train, tmp_path / "two", num_subsets=2, start_id=2, total_num_subsets=4, seed=1
    )
    retrain_lds(
        Recorder(), train, tmp_path / "two", num_subsets=2, start_id=0, total_num_subsets=4, seed=1
    )
    _, a = list_retrained(tmp_path / "one")
    _, b = list_retrained(tmp_path / "two")
    assert [(i, r) for i, r, _ in a] == [(i, r) for i, r, _ in b]
    for (_, _, pa), (_, _, pb) in zip(a, b, strict=True):
        sa, sb = load_retrained_state(pa), load_retrained_state(pb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ConfigError):
        retrain_lds(
            Recorder(), train, tmp_path / "x", num_subsets=3, start_id=2, total_num_subsets=4
        )


def test_retrain_loo_and_ground_truth(tmp_path, loaders):
    train, test = loaders
    f = Recorder()
    retrain_loo(f, train, tmp_path, indices=[5, 2, 9], seed=0)
    x0 = train.dataset.tensors[0][:, 0]
    assert all(
        x0[i].item() not in rows and len(rows) == 3 * (N - 1)
        for (_, rows), i in zip(f.seen, [5, 2, 9], strict=True)
    )
    gt, removed = calculate_loo_ground_truth(target_func, tmp_path, test)
    assert removed.tolist() == [2, 5, 9] and gt.shape == (3, 5)
    _, models = list_retrained(tmp_path)
    assert torch.equal(gt[1], target_func(models[1][2], test))
    score = torch.randn(N, 5, dtype=torch.float64)
    assert loo_corr(score, (gt, removed))[0].shape == (5,)
    with pytest.raises(ConfigError):
        calculate_lds_ground_truth(target_func, tmp_path, test)


def test_retrain_bad_input(tmp_path, loaders):
    train, _ = loaders
    with pytest.raises(ConfigError):
        retrain_loo(Recorder(), train, tmp_path / "a", indices=[])
    with pytest.raises(ConfigError):
        retrain_loo(Recorder(), train, tmp_path / "a", indices=[0, N])
    with pytest.raises(ConfigError):
        retrain_lds(Recorder(), train, tmp_path / "b", subset_ratio=1.0)
    with pytest.raises(ConfigError):
        retrain_lds(Recorder(), train, tmp_path / "b", seed=None)
    retrain_lds(Recorder(), train, tmp_path / "c", num_subsets=1)
    with pytest.raises(ShapeError):
        retrain_lds(Recorder(out_dim=2), train, tmp_path / "c", num_subsets=2)
    with pytest.raises(KeyMismatchError, match=r"train_kwargs\.lr"):
        retrain_lds(Recorder(), train, tmp_path / "c", num_subsets=2, lr=0.5)
    with pytest.raises(NonFiniteError, match="lds model 0"):
        retrain_lds(Recorder(nan=True), train, tmp_path / "d", num_subsets=2)
    assert list_retrained(tmp_path / "d")[1] == []


def test_pickle_in_retrain_dir_is_never_unpickled(tmp_path, loaders):
    train, test = loaders
    retrain_lds(Recorder(), train, tmp_path, num_subsets=2)
    _, models = list_retrained(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    models[1][2].write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeFileError):
        calculate_lds_ground_truth(target_func, tmp_path, test)
    with pytest.raises(UnsafeFileError):
        load_retrained_state(models[1][2])
    assert not marker.exists()
    f = Recorder()
    retrain_lds(f, train, tmp_path, num_subsets=2)  # the bad file is recomputed
    assert len(f.seen) == 1 and not marker.exists()
    assert calculate_lds_ground_truth(target_func, tmp_path, test)[0].shape == (2, 5)
    assert np.isfinite(calculate_lds_ground_truth(target_func, tmp_path, test)[0].numpy()).all()
