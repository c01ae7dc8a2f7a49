"""benchmark.utils: flip_label and SubsetSampler with dattri's semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tdabench.benchmark.utils import SubsetSampler, flip_label
from tdabench.errors import ConfigError, ShapeError


def test_flip_label_tensor_semantics():
    label = torch.arange(200) % 4
    copy = label.clone()
    flipped, idx = flip_label(label, p=0.25, seed=3)
    assert isinstance(flipped, torch.Tensor) and flipped.dtype == label.dtype
    assert isinstance(idx, list) and all(isinstance(i, int) for i in idx)
    assert len(idx) == 50 and len(set(idx)) == 50  # int(p * n) distinct positions
    assert torch.equal(label, copy)  # not modified in place
    mask = torch.zeros(200, dtype=torch.bool)
    mask[idx] = True
    assert bool((flipped[mask] != label[mask]).all())
    assert torch.equal(flipped[~mask], label[~mask])
    assert set(flipped.tolist()) <= {0, 1, 2, 3}
    again, idx2 = flip_label(label, p=0.25, seed=3)
    assert idx2 == idx and torch.equal(again, flipped)


def test_flip_label_binary_space_is_deterministic_and_numpy_kept():
    label = np.array([5, 9, 9, 5, 5, 9, 5, 9], dtype=np.int32)
    flipped, idx = flip_label(label, p=0.5, seed=0)
    assert isinstance(flipped, np.ndarray) and flipped.dtype == np.int32 and len(idx) == 4
    other = {5: 9, 9: 5}  # with two values, a flip has exactly one choice
    assert all(flipped[i] == other[label[i]] for i in idx)


def test_flip_label_uniform_over_other_values():
    # each flipped label takes one of the other 3 values; with 30,000 flips of label 0 the counts of
    # 1, 2, 3 are Binomial(30000, 1/3): within 5 standard deviations (about 408) of 10,000
    label = torch.zeros(30_000, dtype=torch.int64)
    flipped, idx = flip_label(label, label_space=[0, 1, 2, 3], p=1.0, seed=1)
    counts = torch.bincount(flipped, minlength=4).tolist()
    assert counts[0] == 0 and len(idx) == 30_000
    assert all(abs(c - 10_000) < 408 for c in counts[1:])


def test_flip_label_errors():
    with pytest.raises(ConfigError):
        flip_label(torch.zeros(5, dtype=torch.int64))  # one value: nothing to flip into
    with pytest.raises(ConfigError):
        flip_label(torch.tensor([0, 1, 2]), label_space=[0, 1])
    with pytest.raises(ConfigError):
        flip_label(torch.tensor([0, 1]), p=1.5)
    with pytest.raises(ShapeError):
        flip_label(torch.zeros(2, 2, dtype=torch.int64))


def test_subset_sampler_yields_indices_in_order():
    ds = TensorDataset(torch.arange(10.0), torch.arange(10))
    sampler = SubsetSampler([7, 2, 5])
    assert len(sampler) == 3 and list(sampler) == [7, 2, 5]
    loader = DataLoader(ds, batch_size=2, sampler=sampler)
    assert [b[1].tolist() for b in loader] == [[7, 2], [5]]
    assert list(SubsetSampler(torch.tensor([1, 0]))) == [1, 0]
    with pytest.raises(ConfigError):
        SubsetSampler(torch.tensor([0.5]))
