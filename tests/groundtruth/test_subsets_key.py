"""Deterministic subsets/seeds and the ground-truth key."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from tdabench.errors import ConfigError
from tdabench.groundtruth import (
    GroundTruthSpec,
    canonical_json,
    config_diff,
    derive_seed,
    ground_truth_config,
    ground_truth_key,
    model_seed,
    removal_mask,
    sampling_key,
    subset_indices,
    subset_mask,
    subset_size,
)


def test_subsets_are_pure_and_pinned():
    key = sampling_key("lds", 0, 20, 0.5)
    a = subset_indices(key, 3, 20, 0.5)
    assert (
        a.dtype == np.int64
        and a.shape == (10,)
        and np.all(np.diff(a) > 0)
        and a.min() >= 0
        and a.max() < 20
    )
    assert np.array_equal(a, subset_indices(key, 3, 20, 0.5))
    # Pinned: changing the derivation would silently change every stored ground truth.
    digest = hashlib.sha256(b"tdabench\x1fk\x1fsubset\x1f0").digest()
    assert derive_seed("k", "subset", 0) == int.from_bytes(digest[:8], "big") & (2**63 - 1)
    rng = np.random.Generator(np.random.PCG64(derive_seed(key, "subset", 0)))
    assert subset_indices(key, 0, 20, 0.5).tolist() == sorted(
        rng.choice(20, 10, replace=False).tolist()
    )
    assert key == "8d4bd053c99e1eaa3d1aaf92ef95d2a1dae071d1bd311c907c4c35eff8da523c"
    assert subset_indices(key, 0, 20, 0.5).tolist() == [0, 3, 5, 10, 13, 15, 16, 17, 18, 19]
    m = subset_mask(key, 3, 20, 0.5)
    assert m.dtype == torch.bool and m.nonzero().flatten().tolist() == a.tolist()


def test_extending_never_changes_earlier_subsets_and_subsets_differ():
    key = sampling_key("lds", 5, 100, 0.3)
    first = [subset_indices(key, i, 100, 0.3) for i in range(50)]
    later = [subset_indices(key, i, 100, 0.3) for i in range(60)]  # any order, any count
    assert all(np.array_equal(x, y) for x, y in zip(first, later[:50], strict=True))
    assert len({tuple(x) for x in later}) == 60
    # Inclusion frequency is about the ratio (a sanity check on uniformity).
    freq = np.bincount(np.concatenate(later), minlength=100) / 60
    assert abs(freq.mean() - 0.3) < 1e-12 and freq.max() < 0.7


def test_keys_and_seeds_depend_on_what_they_should():
    k = sampling_key("lds", 0, 20, 0.5)
    assert k != sampling_key("lds", 1, 20, 0.5) != sampling_key("lds", 0, 21, 0.5)
    assert k != sampling_key("lds", 0, 20, 0.25)
    assert sampling_key("loo", 0, 20, 0.5) == sampling_key("loo", 0, 20, None)
    seeds = {model_seed(k, i, r) for i in range(30) for r in range(3)}
    assert len(seeds) == 90 and all(0 <= s < 2**63 for s in seeds)


def test_bad_subset_input():
    for ratio in (0.0, 1.0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ConfigError):
            subset_size(20, ratio)
    with pytest.raises(ConfigError):
        subset_size(20, 0.01)  # rounds to 0 samples
    with pytest.raises(ConfigError):
        subset_indices("k", -1, 20, 0.5)
    with pytest.raises(ConfigError):
        removal_mask(20, 20)
    assert removal_mask(3, 5).tolist() == [True, True, True, False, True]


def test_spec_validation():
    with pytest.raises(ConfigError):
        GroundTruthSpec(kind="lds", subset_ratio=1.0)
    with pytest.raises(ConfigError):
        GroundTruthSpec(kind="loo", indices=[])
    with pytest.raises(ConfigError):
        GroundTruthSpec(kind="loo", indices=[1, 1])
    with pytest.raises(ConfigError):
        GroundTruthSpec(kind="loo", indices=[-1])
    with pytest.raises(ConfigError):
        GroundTruthSpec(kind="loo", indices=[3, 25], n_train=20)
    with pytest.raises(ConfigError):
        GroundTruthSpec(kind="lds", num_runs=0)
    with pytest.raises(ConfigError):
        GroundTruthSpec(kind="lds", seed=None)
    with pytest.raises(ConfigError):
        GroundTruthSpec(kind="lds", targets=())
    with pytest.raises(ConfigError):
        GroundTruthSpec(kind="other")
    spec = GroundTruthSpec(kind="loo", indices=[7, 2, 13], shard_size=5)
    assert spec.indices == (2, 7, 13) and spec.shard_ids(20) == [0, 1, 2]
    assert spec.shard_entries(1, 20) == [7] and spec.shard_bounds(2) == (10, 15)


def test_key_identifies_population_not_selection():
    fp = {"name": "t", "recipe": {"lr": 0.1}}
    base = GroundTruthSpec(kind="lds", num_subsets=50, seed=1)
    k = ground_truth_key(base, fp, 40)
    assert k == ground_truth_key(GroundTruthSpec(kind="lds", num_subsets=60, seed=1), fp, 40)
    assert k == ground_truth_key(ground_truth_config(base, fp, 40))
    for other in (
        GroundTruthSpec(kind="lds", seed=2),
        GroundTruthSpec(kind="lds", seed=1, subset_ratio=0.4),
        GroundTruthSpec(kind="lds", seed=1, num_runs=2),
        GroundTruthSpec(kind="lds", seed=1, targets=("margin",)),
        GroundTruthSpec(kind="lds", seed=1, shard_size=7),
    ):
        assert ground_truth_key(other, fp, 40) != k
    assert ground_truth_key(base, {"name": "t", "recipe": {"lr": 0.2}}, 40) != k
    assert ground_truth_key(base, fp, 41) != k
    loo = GroundTruthSpec(kind="loo", indices=[1, 2])
    assert ground_truth_key(loo, fp, 40) == ground_truth_key(GroundTruthSpec(kind="loo"), fp, 40)
    diff = config_diff(
        ground_truth_config(base, fp, 40),
        ground_truth_config(base, {"name": "t", "recipe": {"lr": 0.2}}, 40),
    )
    assert diff == [("trainer.recipe.lr", 0.1, 0.2)]


def test_canonical_json_rejects_what_cannot_be_keyed():
    assert canonical_json({"b": 1, "a": (1.5, None)}) == '{"a":[1.5,null],"b":1}'
    with pytest.raises(ConfigError):
        canonical_json({"x": float("nan")})
    with pytest.raises(ConfigError):
        canonical_json({"x": torch.zeros(2)})


def test_loo_models_of_a_run_share_their_seed_lds_do_not():
    from tdabench.groundtruth.subsets import entry_model_seed

    k = "k" * 64
    assert entry_model_seed("loo", k, 3, 0) == entry_model_seed("loo", k, 7, 0)
    assert entry_model_seed("loo", k, 3, 0) != entry_model_seed("loo", k, 3, 1)
    assert entry_model_seed("lds", k, 3, 0) != entry_model_seed("lds", k, 7, 0)
    with pytest.raises(ConfigError):
        entry_model_seed("loo", k, 3, -1)
