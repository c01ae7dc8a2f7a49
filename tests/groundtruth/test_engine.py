"""The sharded store: correctness against direct training, resume, extension, faults."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from tdabench.errors import (
    ConfigError,
    KeyMismatchError,
    NonFiniteError,
    ShapeError,
    StoreError,
    UnsafeFileError,
)
from tdabench.groundtruth import (
    GroundTruthSpec,
    GroundTruthStore,
    ToySoftmaxTrainer,
    entry_model_seed,
    load_ground_truth,
    load_runs,
    make_toy_data,
    merge,
    missing_shards,
    model_seed,
    open_store,
    run_shard,
    run_shards,
    subset_indices,
    subset_mask,
    verify,
)
from tdabench.metric import lds, stored_noise_ceiling


class CountingTrainer(ToySoftmaxTrainer):
    """Toy trainer that records every trained (mask, seed)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[int] = []

    def train(self, masks, seeds):
        self.calls.append(len(seeds))
        return super().train(masks, seeds)


@pytest.fixture(scope="module")
def data():
    return make_toy_data(n_train=40, n_test=6, dim=4, num_classes=3, seed=0)


def _trainer(data, cls=CountingTrainer, **kw):
    tr, te = data
    return cls(tr, te, 3, epochs=2, **kw)


def _digests(store):
    return {p.name: pq.read_schema(p).metadata[b"tdabench.sha256"] for _, p in store.shard_files()}


def test_values_equal_direct_training_and_lds_runs(tmp_path, data):
    t = _trainer(data)
    spec = GroundTruthSpec(
        kind="lds", num_subsets=12, shard_size=5, targets=("margin", "loss"), seed=3
    )
    store = open_store(tmp_path / "s", spec, t)
    assert missing_shards(store, spec) == [0, 1, 2]
    rep = run_shards(store, spec, t, progress=False)
    assert rep["done"] == [0, 1, 2] and t.calls == [5, 5, 2]
    values, subsets = load_ground_truth(merge(store, spec), "margin")
    assert values.shape == (12, 6) and subsets.shape == (12, 20)
    # Oracle: train entry 7 directly from its derived mask and seed.
    skey = spec.sampling_key(40)
    assert subsets[7].tolist() == subset_indices(skey, 7, 40, 0.5).tolist()
    st = t.train(subset_mask(skey, 7, 40, 0.5)[None], [model_seed(skey, 7, 0)])
    assert torch.equal(values[7], t.evaluate(st, "margin")[0])
    loss, _ = load_ground_truth(tmp_path / "s", "loss")
    assert torch.equal(loss[7], t.evaluate(st, "loss")[0])
    corr, _ = lds(torch.randn(40, 6, dtype=torch.float64), (values, subsets))
    assert corr.shape == (6,)
    # Metadata on every file.
    meta = pq.read_schema(store.merged_path).metadata
    for k in ("key", "config", "version", "rows", "sha256"):
        assert f"tdabench.{k}".encode() in meta
    for k in ("revision", "created"):  # volatile facts stay out: a recompute is byte-identical
        assert f"tdabench.{k}".encode() not in meta
    assert meta[b"tdabench.key"].decode() == store.key and meta[b"tdabench.rows"] == b"12"
    assert json.loads(meta[b"tdabench.config"])["trainer"]["recipe"]["epochs"] == 2


def test_rerun_skips_complete_shards_and_extension_keeps_key(tmp_path, data):
    t = _trainer(data)
    spec = GroundTruthSpec(kind="lds", num_subsets=8, shard_size=4)
    store = open_store(tmp_path, spec, t)
    run_shards(store, spec, t, progress=False)
    before = _digests(store)
    t.calls.clear()
    assert run_shards(store, spec, t, progress=False)["skipped"] == [0, 1] and t.calls == []
    run_shard(store, spec, t, 1)
    assert t.calls == []
    bigger = GroundTruthSpec(kind="lds", num_subsets=14, shard_size=4)
    store2 = open_store(tmp_path, bigger, t)  # same key: num_subsets is a selection
    assert store2.key == store.key and missing_shards(store2, bigger) == [2, 3]
    run_shards(store2, bigger, t, progress=False)
    assert t.calls == [4, 2]
    after = _digests(store2)
    assert all(after[k] == v for k, v in before.items())
    # Growing the partial last shard recomputes it (it lacks entries 14, 15).
    t.calls.clear()
    full = GroundTruthSpec(kind="lds", num_subsets=16, shard_size=4)
    assert missing_shards(store2, full) == [3]
    run_shards(store2, full, t, progress=False)
    assert t.calls == [4]
    v14, _ = load_ground_truth(store2, "loss")
    assert v14.shape[0] == 16


def test_sharding_and_order_do_not_change_values(tmp_path, data):
    t = _trainer(data)
    spec = GroundTruthSpec(kind="lds", num_subsets=9, shard_size=3, num_runs=2)
    a = open_store(tmp_path / "a", spec, t)
    b = open_store(tmp_path / "b", spec, t)
    run_shards(a, spec, t, progress=False)
    for sid in (2, 0, 1):
        run_shard(b, spec, t, sid)
    assert _digests(a) == _digests(b)
    va, _, _ = load_runs(a, "loss")
    assert va.shape == (9, 2, 6)
    other = GroundTruthSpec(kind="lds", num_subsets=9, shard_size=9, num_runs=2)
    c = open_store(tmp_path / "c", other, t)
    run_shards(c, other, t, progress=False)
    assert torch.equal(load_runs(c, "loss")[0], va)  # toy models do not interact


def test_loo_store(tmp_path, data):
    t = _trainer(data)
    spec = GroundTruthSpec(kind="loo", indices=[3, 17, 4, 30], shard_size=4, targets=("loss",))
    store = open_store(tmp_path, spec, t)
    assert missing_shards(store, spec) == [0, 1, 4, 7]
    run_shards(store, spec, t, progress=False)
    gt, removed = load_ground_truth(merge(store, spec), "loss")
    assert removed.tolist() == [3, 4, 17, 30] and gt.shape == (4, 6)
    mask = torch.ones(40, dtype=torch.bool)
    mask[17] = False
    skey = spec.sampling_key(40)
    st = t.train(mask[None], [entry_model_seed("loo", skey, 17, 0)])
    assert torch.equal(gt[2], t.evaluate(st, "loss")[0])
    more = GroundTruthSpec(kind="loo", indices=[3, 4, 5, 17, 30], shard_size=4)
    assert open_store(tmp_path, more, t).key == store.key
    assert missing_shards(store, more) == [1]


def test_key_mismatch_names_fields(tmp_path, data):
    spec = GroundTruthSpec(kind="lds", num_subsets=4, shard_size=4)
    open_store(tmp_path, spec, _trainer(data))
    with pytest.raises(KeyMismatchError, match=r"trainer\.recipe\.lr: 0\.5 -> 0\.1"):
        open_store(tmp_path, spec, _trainer(data, lr=0.1))
    with pytest.raises(KeyMismatchError, match="subset_ratio"):
        open_store(
            tmp_path, GroundTruthSpec(kind="lds", subset_ratio=0.3, shard_size=4), _trainer(data)
        )
    store = GroundTruthStore(tmp_path)  # open without a key: trusts the manifest
    with pytest.raises(KeyMismatchError, match="num_runs"):
        run_shard(
            store,
            GroundTruthSpec(kind="lds", num_subsets=4, shard_size=4, num_runs=2),
            _trainer(data),
            0,
        )
    # A tampered manifest is refused.
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["config"]["seed"] = 9
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="altered"):
        GroundTruthStore(tmp_path)


def _complete_store(tmp_path, data, **kw):
    t = _trainer(data)
    spec = GroundTruthSpec(kind="lds", num_subsets=6, shard_size=3, **kw)
    store = open_store(tmp_path, spec, t)
    run_shards(store, spec, t, progress=False)
    return t, spec, store


def test_truncated_and_corrupted_shards_are_detected_and_recomputed(tmp_path, data):
    t, spec, store = _complete_store(tmp_path, data)
    ref = _digests(store)
    p0, p1 = store.shard_path(0), store.shard_path(1)
    p0.write_bytes(p0.read_bytes()[: p0.stat().st_size // 2])  # truncated
    # Valid Parquet, altered value, old metadata: only the checksum can tell.
    table = pq.read_table(p1)
    col = table.column("target.loss").combine_chunks()
    vals = col.flatten().to_numpy().copy()
    vals[3] += 1e-9
    import pyarrow as pa

    table = table.set_column(
        table.column_names.index("target.loss"),
        "target.loss",
        pa.FixedSizeListArray.from_arrays(pa.array(vals), 6),
    )
    pq.write_table(table, p1)
    with pytest.raises(StoreError, match=r"shard 0: .*truncated or corrupted.*shard 1: .*checksum"):
        merge(store)
    with pytest.raises(StoreError):
        load_ground_truth(tmp_path, "loss")
    assert missing_shards(store, spec) == [0, 1]
    t.calls.clear()
    run_shards(store, spec, t, progress=False)
    assert t.calls == [3, 3] and _digests(store) == ref
    merge(store, spec)


def test_foreign_shard_is_never_mixed(tmp_path, data):
    t, spec, store = _complete_store(tmp_path / "a", data)
    other_spec = GroundTruthSpec(kind="lds", num_subsets=6, shard_size=3, seed=1)
    other = open_store(tmp_path / "b", other_spec, t)
    run_shard(other, other_spec, t, 0)
    shutil.copy(other.shard_path(0), store.shard_path(0))
    assert missing_shards(store, spec) == [0]
    with pytest.raises(StoreError, match="key"):
        merge(store)


def test_checkpoints_and_pickle_refusal(tmp_path, data):
    t, spec, store = _complete_store(tmp_path, data, keep_checkpoints=True)
    stacked, rows = store.load_checkpoint(1)
    assert rows == [(3, 0), (4, 0), (5, 0)] and stacked["weight"].shape == (3, 3, 4)
    assert torch.equal(t.evaluate(stacked, "loss"), load_ground_truth(tmp_path, "loss")[0][3:])
    # A pickle whose unpickling would create a file.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    store.checkpoint_path(0).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeFileError, match="pickle"):
        store.load_checkpoint(0)
    assert not marker.exists()
    assert missing_shards(store, spec) == [0]
    # Truncated checkpoint.
    c1 = store.checkpoint_path(1)
    c1.write_bytes(c1.read_bytes()[:-10])
    with pytest.raises(StoreError, match="truncated"):
        store.load_checkpoint(1)
    assert missing_shards(store, spec) == [0, 1]
    run_shards(store, spec, t, progress=False)
    assert not marker.exists() and missing_shards(store, spec) == []
    assert store.load_checkpoint(0)[1] == [(0, 0), (1, 0), (2, 0)]
    # Altered weights (same size) are caught by the tensor checksum.
    raw = bytearray(c1.read_bytes())
    raw[-3] ^= 0xFF
    c1.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="checksum"):
        store.load_checkpoint(1)


class NaNTrainer(CountingTrainer):
    def __init__(self, *a, bad_seed=None, **kw):
        super().__init__(*a, **kw)
        self.bad_seed = bad_seed

    def train(self, masks, seeds):
        st = super().train(masks, seeds)
        for i, s in enumerate(seeds):
            if s == self.bad_seed:
                st["weight"][i, 0, 0] = float("nan")
        return st


def test_nan_fails_only_its_shard(tmp_path, data):
    spec = GroundTruthSpec(kind="lds", num_subsets=9, shard_size=3)
    skey = spec.sampling_key(40)
    t = _trainer(data, NaNTrainer, bad_seed=model_seed(skey, 4, 0))
    store = open_store(tmp_path, spec, t)
    with pytest.raises(StoreError, match=r"shard 1: NonFiniteError.*entry 4, run 0"):
        run_shards(store, spec, t, progress=False)
    assert missing_shards(store, spec) == [1] and not store.shard_path(1).exists()
    rep = run_shards(store, spec, t, raise_on_error=False, progress=False)
    assert list(rep["failed"]) == [1] and rep["skipped"] == [0, 2]
    with pytest.raises(NonFiniteError, match="entry 4"):
        run_shard(store, spec, t, 1)
    with pytest.raises(StoreError, match=r"\[1\]"):
        merge(store, spec)


class BadShapeTrainer(CountingTrainer):
    def __init__(self, *a, mode="train", **kw):
        super().__init__(*a, **kw)
        self.mode = mode

    def train(self, masks, seeds):
        st = super().train(masks, seeds)
        if self.mode == "train":
            st["bias"] = st["bias"][:-1]
        if self.mode == "notdict":
            return [st["weight"]]
        return st

    def evaluate(self, stacked, target):
        v = super().evaluate(stacked, target)
        return v[:, :, None] if self.mode == "evaluate" else v


@pytest.mark.parametrize("mode", ["train", "notdict", "evaluate"])
def test_wrong_shapes_are_clear_errors(tmp_path, data, mode):
    spec = GroundTruthSpec(kind="lds", num_subsets=3, shard_size=3)
    t = _trainer(data, BadShapeTrainer, mode=mode)
    store = open_store(tmp_path, spec, t)
    with pytest.raises(ShapeError):
        run_shard(store, spec, t, 0)
    assert not store.shard_path(0).exists()


def test_bad_shard_and_spec_input(tmp_path, data):
    t = _trainer(data)
    with pytest.raises(ConfigError):
        open_store(tmp_path, GroundTruthSpec(kind="loo", indices=[1, 40]), t)
    spec = GroundTruthSpec(kind="lds", num_subsets=3, shard_size=3)
    store = open_store(tmp_path, spec, t)
    with pytest.raises(ConfigError):
        run_shard(store, spec, t, 5)
    with pytest.raises(ConfigError):
        run_shard(store, spec, t, -1)


def test_verify_and_noise_ceiling(tmp_path, data):
    t, _, store = _complete_store(tmp_path, data, num_runs=2, targets=("margin",))
    rep = verify(store, t, k=4, seed=0)
    assert rep.ok and len(rep.checked) == 4 and rep.max_abs_diff == 0.0
    assert verify(store, t, k=3, seed=1, whole_shards=False).ok
    # Same fingerprint, different numbers (a software drift): verify reports the entries.
    drift = _trainer(data)
    drift.lr = 0.4999  # not reflected in the fingerprint on purpose
    drift.fingerprint = t.fingerprint
    bad = verify(store, drift, k=2, seed=0)
    assert not bad.ok and {d["entry"] for d in bad.differing} == {e for e, _ in bad.checked}
    assert verify(store, drift, k=2, seed=0, atol=1e-2).ok
    with pytest.raises(KeyMismatchError):
        verify(store, _trainer(data, lr=0.3), k=1)
    nc = stored_noise_ceiling(tmp_path, "margin")
    assert nc.num_runs == 2 and nc.ceiling.shape == (6,)
    v, _, _ = load_runs(tmp_path, "margin")
    from scipy import stats

    j = 0
    assert nc.run_corr[j].item() == pytest.approx(stats.spearmanr(v[:, 0, j], v[:, 1, j]).statistic)


def test_stale_temporaries_are_cleaned(tmp_path, data):
    t, spec, store = _complete_store(tmp_path, data)
    import socket

    stale = (
        store.shards_dir
        / f".{store.shard_path(0).name}.{socket.gethostname().replace('.', '_')}.999999999.tmp"
    )
    stale.write_bytes(b"partial")
    store.shard_path(0).unlink()
    run_shard(store, spec, t, 0)
    assert not stale.exists() and sorted(os.listdir(store.shards_dir)) == [
        p.name for _, p in store.shard_files()
    ]
