"""calculate_{lds,loo}_ground_truth: values against a direct reading, and every refusal."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdabench.errors import ConfigError, StoreError
from tdabench.metric import calculate_lds_ground_truth, calculate_loo_ground_truth
from tdabench.model_util.retrain import (
    list_retrained,
    load_retrained_state,
    retrain_lds,
    retrain_loo,
)

N, D = 12, 2


def _train(loader, seed):
    model = nn.Linear(D, 1).double()
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    with torch.no_grad():  # least squares on the loader's rows, shifted by the seed
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T + 1e-3 * (seed % 7))
        model.bias.zero_()
    return model


def _target(path, loader):
    model = nn.Linear(D, 1).double()
    model.load_state_dict(load_retrained_state(path))
    x, y, _ = next(iter(loader))
    with torch.no_grad():
        return (model(x).squeeze(-1) - y) ** 2


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -1.0], dtype=torch.float64) + 0.3 * torch.randn(
        N, generator=g, dtype=torch.float64
    )
    train = DataLoader(TensorDataset(x, y, torch.arange(N)), batch_size=4)
    test = DataLoader(TensorDataset(x[:3], y[:3], torch.arange(3)), batch_size=3)
    return train, test


def test_lds_values_are_the_negated_run_means(tmp_path, data) -> None:
    train, test = data
    retrain_lds(_train, train, tmp_path, num_subsets=3, subset_ratio=0.5, num_runs_per_subset=2)
    _, models = list_retrained(tmp_path)
    gt, subsets = calculate_lds_ground_truth(_target, tmp_path, test)
    runs, _ = calculate_lds_ground_truth(_target, tmp_path, test, negate=False, return_runs=True)
    for i in range(3):
        per_run = torch.stack([_target(p, test) for j, _, p in models if j == i]).double()
        assert torch.equal(runs[i], per_run)
        assert torch.equal(gt[i], (-per_run).mean(dim=0))
    assert subsets.shape == (3, N // 2) and gt.dtype == torch.float64


def test_wrong_kind_empty_incomplete_and_mixed_up_directories(tmp_path, data) -> None:
    train, test = data
    retrain_loo(_train, train, tmp_path / "loo", indices=[1, 4])
    with pytest.raises(ConfigError, match="use calculate_loo_ground_truth"):
        calculate_lds_ground_truth(_target, tmp_path / "loo", test)
    retrain_lds(_train, train, tmp_path / "lds", num_subsets=2, num_runs_per_subset=2)
    with pytest.raises(ConfigError, match="use calculate_lds_ground_truth"):
        calculate_loo_ground_truth(_target, tmp_path / "lds", test)
    _, models = list_retrained(tmp_path / "lds")
    shutil.copy(models[0][2], models[3][2])  # subset 1 run 1 now holds subset 0's model
    with pytest.raises(StoreError, match="differs from subset 1"):
        calculate_lds_ground_truth(_target, tmp_path / "lds", test)
    models[3][2].unlink()
    with pytest.raises(StoreError, match=r"subsets \[1\] lack some of their 2 runs"):
        calculate_lds_ground_truth(_target, tmp_path / "lds", test)
    for _, _, p in list_retrained(tmp_path / "loo")[1]:
        p.unlink()
    with pytest.raises(StoreError, match="holds no models; run retrain_loo first"):
        calculate_loo_ground_truth(_target, tmp_path / "loo", test)
