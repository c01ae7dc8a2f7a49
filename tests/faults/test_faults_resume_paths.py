"""Issue 14 items 2, 3 and 6: checkpoints verified on load and on resume (a damaged file is
recomputed, never used), manifest and index names kept inside their directory, diverged
training refused, and stage outputs written atomically when run by hand."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fault_helpers import METHOD, REPO

from tdabench import _io
from tdabench.errors import NonFiniteError, UnsafePathError
from tdabench.groundtruth import (
    GroundTruthSpec,
    ToySoftmaxTrainer,
    make_toy_data,
    missing_shards,
    open_store,
    run_shards,
)


def _flip(path: Path, from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - from_end] ^= 0x08
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- item 2


def test_store_checkpoint_bit_flip_is_recomputed_on_resume(tmp_path):
    tr, te = make_toy_data(n_train=30, n_test=4, dim=3, num_classes=3, seed=0)
    trainer = ToySoftmaxTrainer(tr, te, 3, epochs=2)
    spec = GroundTruthSpec(
        kind="lds", num_subsets=6, shard_size=3, targets=("loss",), keep_checkpoints=True
    )
    store = open_store(tmp_path / "s", spec, trainer)
    run_shards(store, spec, trainer, progress=False)
    ckpt = store.checkpoint_path(1)
    good = ckpt.read_bytes()
    _flip(ckpt, 5)  # inside the tensor data: header and size stay valid
    assert missing_shards(store, spec) == [1]  # resume sees the damage (weights re-hashed)
    with pytest.raises(_io.IntegrityError, match="fails its checksum"):
        store.load_checkpoint(1)  # and load never hands it out
    rep = run_shards(store, spec, trainer, progress=False)
    assert rep["done"] == [1] and rep["skipped"] == [0]
    assert ckpt.read_bytes() == good  # recomputed, identical


def test_pipeline_shard_bit_flip_is_recomputed_by_the_groundtruth_stage(tiny, tiny_base):
    store = Path(tiny.p["groundtruth"]["lds"]["dir"])
    shard = sorted((store / "shards").glob("*.parquet"))[0]
    good = shard.read_bytes()
    t = pq.read_table(shard)
    old = t.schema.metadata
    col = t.column("target.margin").combine_chunks()
    import pyarrow as pa

    vals = col.flatten().to_numpy().copy()
    vals[0] += 1.0
    edited = t.set_column(
        t.schema.get_field_index("target.margin"),
        "target.margin",
        pa.FixedSizeListArray.from_arrays(pa.array(vals), col.type.list_size),
    )
    pq.write_table(edited.replace_schema_metadata(old), shard)
    tiny.groundtruth("lds")  # the resume recomputes the damaged shard, never uses it
    assert shard.read_bytes() == good
    tiny.merge("lds")
    merged = Path(tiny.p["groundtruth"]["lds"]["merged"])
    base = tiny_base / merged.relative_to(tiny.results)
    assert merged.read_bytes() == base.read_bytes()


# ----------------------------------------------------------------------------- item 3


@pytest.mark.parametrize("name", ["../data/x.safetensors", "/etc/hostname", "a/../../b"])
def test_models_manifest_names_stay_inside(tiny, name):
    man_path = Path(tiny.p["models"]) / "manifest.json"
    man = json.loads(man_path.read_text())
    man["files"]["clean"][0][-1] = name
    _io.write_json(man_path, {k: v for k, v in man.items() if k != "sha256"})  # re-stamped
    with pytest.raises(UnsafePathError, match="models manifest entry"):
        tiny.attribute()


def test_models_manifest_symlink_escaping_is_refused(tiny, tmp_path):
    outside = tmp_path / "outside.safetensors"
    models = Path(tiny.p["models"])
    name = json.loads((models / "manifest.json").read_text())["files"]["clean"][0][-1]
    (models / name).rename(outside)
    (models / name).symlink_to(outside)
    with pytest.raises(UnsafePathError, match="symlink"):
        tiny.attribute()


def test_completion_record_store_stays_inside(tiny):
    g = tiny.p["groundtruth"]["loo"]
    body = json.loads(Path(g["complete"]).read_text())
    body["store"] = "../../lds"
    _io.write_json(g["complete"], {k: v for k, v in body.items() if k != "sha256"})
    with pytest.raises(UnsafePathError, match="completion record store"):
        tiny.merge("loo")


def test_store_shard_symlink_escaping_is_refused(tiny, tmp_path):
    store = Path(tiny.p["groundtruth"]["loo"]["dir"])
    shard = sorted((store / "shards").glob("*.parquet"))[0]
    outside = tmp_path / "elsewhere.parquet"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(UnsafePathError, match="shard file"):
        tiny.merge("loo")


def test_maestro_index_names_stay_inside(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "benchmark"))
    from _benchmark_files import write_maestro

    from tdabench.benchmark.data.maestro import load_maestro

    root = tmp_path / "maestro-v3.0.0"
    write_maestro(root)
    with open(root / "maestro-v3.0.0.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["midi_filename"] = "../../outside.midi"
    with open(root / "maestro-v3.0.0.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(UnsafePathError, match="midi_filename"):
        load_maestro(root, n_train=6, n_test=5, seq_len=16, test_windows_per_piece=1)


def test_retrained_model_symlink_escaping_is_refused(tmp_path):
    from tdabench.model_util.retrain import list_retrained

    root = tmp_path / "retrain"
    (root / "models").mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"kind": "loo"}))
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    (root / "models" / "loo-0000001-run0.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(UnsafePathError, match="retrained model"):
        list_retrained(root)


# ----------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("lr", [1e30, float("inf")])
def test_diverged_training_fails_and_leaves_nothing(tiny, lr):
    import shutil

    models = Path(tiny.p["models"])
    shutil.rmtree(models)
    tiny.cfg["benchmark_configs"]["mnist_lr_smoke"]["recipe"]["lr"] = lr
    models = Path(tiny.p["models"])  # the spec (and so the path) changed with the recipe
    with pytest.raises(NonFiniteError, match=r"training diverged.*lower the learning rate"):
        tiny.train()
    assert not models.exists()
    assert not list(models.parent.glob(".*"))  # no temporary directory left


def test_diverged_retraining_fails_the_shard(tiny):
    tiny.cfg["benchmark_configs"]["mnist_lr_smoke"]["recipe"]["lr"] = 1e30
    from tdabench.pipeline.launcher import LaunchError

    with pytest.raises(LaunchError, match="still incomplete"):
        tiny.groundtruth("loo")
    log = sorted((tiny.results / "submitit").glob("debug-shard*.log"))[0].read_text()
    assert "NonFiniteError" in log and "diverged" in log


def test_failed_train_keeps_the_previous_models(tiny, monkeypatch):
    models = Path(tiny.p["models"])
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    import tdabench.groundtruth.reference as reference

    def boom(*a, **kw):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(reference, "_train_variant", boom)
    with pytest.raises(RuntimeError):
        tiny.train()
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before
    assert METHOD  # the models above are what attribute reads
