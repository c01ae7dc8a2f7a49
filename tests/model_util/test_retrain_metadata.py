"""retrain_lds / retrain_loo write dattri's metadata.yml and .pt layout beside the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdabench.metric import calculate_lds_ground_truth
from tdabench.model_util.retrain import (
    list_retrained,
    load_retrained_state,
    retrain_lds,
    retrain_loo,
)

N, D = 12, 2


@pytest.fixture
def loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x.sum(dim=1, keepdim=True)
    xt = torch.randn(4, D, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(x, y), batch_size=4), DataLoader(
        TensorDataset(xt, xt.sum(1, keepdim=True)), batch_size=4
    )


_FAIL_AFTER: list[int | None] = [None]  # simulate an interruption after this many calls


def train_func(loader, seed=None):
    if _FAIL_AFTER[0] is not None:
        if _FAIL_AFTER[0] == 0:
            raise RuntimeError("interrupted")
        _FAIL_AFTER[0] -= 1
    model = nn.Linear(D, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for xb, yb in loader:
        opt.zero_grad()
        ((model(xb) - yb) ** 2).mean().backward()
        opt.step()
    return model


def _dattri_style_lds(target_func, retrain_dir, test_loader):
    """An independent reader of dattri's layout (what its calculate_lds_ground_truth does)."""
    meta = yaml.safe_load((Path(retrain_dir) / "metadata.yml").read_text())
    values, indices = [], []
    for i in range(meta["num_subsets"]):
        sub = Path(meta["subset_dir_map"][i])
        indices.append([int(v) for v in (sub / "indices.txt").read_text().splitlines()])
        runs = [
            target_func(sub / f"model_weights_{j}.pt", test_loader)
            for j in range(meta["num_runs_per_subset"])
        ]
        values.append(torch.stack(runs).mean(0))
    return -torch.stack(values), torch.tensor(indices)


def _target_safetensors(path, loader):
    model = nn.Linear(D, 1).double()
    model.load_state_dict(load_retrained_state(path))
    return torch.cat([((model(x) - y) ** 2)[:, 0] for x, y in loader]).detach()


def _target_pt(path, loader):
    model = nn.Linear(D, 1).double()
    model.load_state_dict(torch.load(path, weights_only=True))
    return torch.cat([((model(x) - y) ** 2)[:, 0] for x, y in loader]).detach()


def test_lds_metadata_is_readable_the_dattri_way(tmp_path, loaders):
    train, test = loaders
    path = tmp_path / "lds"
    retrain_lds(train_func, train, path, num_subsets=3, num_runs_per_subset=2, seed=5)
    meta = yaml.safe_load((path / "metadata.yml").read_text())
    assert meta["mode"] == "lds" and meta["data_length"] == N and meta["train_func"] == "train_func"
    assert (
        meta["num_subsets"] == 3
        and meta["num_runs_per_subset"] == 2
        and meta["subset_ratio"] == 0.5
    )
    assert meta["subset_dir_map"] == {i: str(path / str(i)) for i in range(3)}
    _, models = list_retrained(path)
    for index, run, p in models:  # the .pt copy holds exactly the safetensors weights
        pt = torch.load(path / str(index) / f"model_weights_{run}.pt", weights_only=True)
        st = load_retrained_state(p)
        assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in st)
    ours_v, ours_idx = calculate_lds_ground_truth(_target_safetensors, path, test)
    theirs_v, theirs_idx = _dattri_style_lds(_target_pt, path, test)
    assert torch.equal(ours_idx, theirs_idx)
    torch.testing.assert_close(ours_v, theirs_v, rtol=0, atol=1e-14)


def test_metadata_counts_only_complete_subsets_without_gaps(tmp_path, loaders):
    train, _ = loaders
    path = tmp_path / "lds"
    retrain_lds(train_func, train, path, num_subsets=2, start_id=2, seed=1)  # a later slice first
    meta = yaml.safe_load((path / "metadata.yml").read_text())
    assert meta["num_subsets"] == 0 and sorted(meta["subset_dir_map"]) == [2, 3]
    _FAIL_AFTER[0] = 1
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            retrain_lds(train_func, train, path, num_subsets=2, start_id=0, seed=1)
    finally:
        _FAIL_AFTER[0] = None
    meta = yaml.safe_load((path / "metadata.yml").read_text())  # written on the way out
    assert meta["num_subsets"] == 1 and sorted(meta["subset_dir_map"]) == [0, 2, 3]
    (path / "0" / "model_weights_0.pt").unlink()  # a lost copy is re-exported on resume
    retrain_lds(train_func, train, path, num_subsets=2, start_id=0, seed=1)
    meta = yaml.safe_load((path / "metadata.yml").read_text())
    assert meta["num_subsets"] == 4 and (path / "0" / "model_weights_0.pt").exists()


def test_loo_metadata_and_opt_out(tmp_path, loaders):
    train, _ = loaders
    retrain_loo(train_func, train, tmp_path / "loo", indices=[3, 1], seed=0)
    meta = yaml.safe_load((tmp_path / "loo" / "metadata.yml").read_text())
    assert meta["mode"] == "loo" and meta["indices"] == [1, 3] and meta["data_length"] == N
    assert meta["map_index_dir"] == {i: str(tmp_path / "loo" / f"index_{i}") for i in (1, 3)}
    st = load_retrained_state(list_retrained(tmp_path / "loo")[1][0][2])
    pt = torch.load(tmp_path / "loo" / "index_1" / "model_weights.pt", weights_only=True)
    assert all(torch.equal(pt[k], st[k]) for k in st)
    retrain_lds(train_func, train, tmp_path / "plain", num_subsets=1, seed=0, dattri_layout=False)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["manifest.json", "models"]
