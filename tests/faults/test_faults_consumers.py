"""Issue 14 item 1: nothing is evaluated from tampered, mismatched or partial inputs.

Each test damages one output of a tiny real run (the way the reliability review did) and checks
that the consuming stage refuses it with a typed error naming the file and the fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fault_helpers import METHOD, B, Run, tiny_config

from tdabench import _io
from tdabench.errors import (
    IntegrityError,
    NonFiniteError,
    ProvenanceError,
    ShapeError,
    UnsafeFileError,
)
from tdabench.pipeline.io import read_scores, write_scores


def _rewrite_keeping_stamps(path, table):
    """Write ``table`` to ``path`` with the old file's tdabench metadata (a careless edit)."""
    old = pq.read_schema(path).metadata
    pq.write_table(table.replace_schema_metadata(old), path)


def test_shuffled_score_rows_are_refused(tiny):
    p = tiny.p["scores"][METHOD]
    t = pq.read_table(p)
    perm = np.random.default_rng(0).permutation(t.num_rows)
    shuffled = pa.table({"train_index": t["train_index"], "scores": t["scores"].take(perm)})
    _rewrite_keeping_stamps(p, shuffled)
    with pytest.raises(
        IntegrityError, match=r"scores\.parquet.*fails its checksum.*rerun the attribute"
    ):
        tiny.evaluate()


def test_reordered_and_restamped_rows_are_refused(tiny):
    # even with a fresh, consistent checksum, train_index must run 0..n-1 in order
    p = tiny.p["scores"][METHOD]
    table, meta = _io.read_parquet(p)
    perm = np.random.default_rng(1).permutation(table.num_rows)
    prov = json.loads(meta["provenance"])
    _io.write_parquet(p, table.take(pa.array(perm)), {"n_train": 120, "n_test": 12}, prov)
    with pytest.raises(IntegrityError, match=r"train_index is not 0\.\.119 in order"):
        tiny.evaluate()


def test_edited_noisy_labels_are_refused(tiny):
    p = tiny.p["noisy"]
    t = pq.read_table(p)
    flipped = t["flipped"].to_numpy().copy()
    flipped[:5] = ~flipped[:5]
    cols = {n: t[n] for n in t.column_names}
    cols["flipped"] = pa.array(flipped)
    _rewrite_keeping_stamps(p, pa.table(cols))
    with pytest.raises(IntegrityError, match=r"noisy\.parquet.*fails its checksum.*prepare"):
        tiny.evaluate()


def test_scores_with_missing_test_columns_are_a_shape_error(tiny):
    p = tiny.p["scores"][METHOD]
    s, meta = read_scores(p)
    write_scores(p, s[:, :10], {"method": meta["method"]}, meta["provenance"])  # 10 of 12
    with pytest.raises(ShapeError, match=r"scores\.parquet. has 10 test columns.*expected 12"):
        tiny.evaluate()


def test_nan_scores_refused_unless_allowed_and_then_counted(tiny):
    p = tiny.p["scores"][METHOD]
    s, meta = read_scores(p)
    s[:, 3] = np.nan
    s[7, 5] = np.inf
    write_scores(p, s, {"method": meta["method"]}, meta["provenance"])
    with pytest.raises(NonFiniteError, match=r"NaN/inf scores in 2 of 12 test columns"):
        tiny.evaluate()
    tiny.cfg["evaluate"]["allow_nan_scores"] = True
    m = tiny.evaluate()
    assert m["lds"]["n_test"] == 10 and m["lds"]["nan_test_points"] == 2
    assert m["loo"]["n_test"] == 10 and np.isfinite(m["lds"]["value"])


def test_another_benchmarks_ground_truth_is_refused(tiny, tmp_path):
    other = tmp_path / "other" / "results"
    cfg = tiny_config(other)
    cfg["benchmark_configs"][B]["data"]["seed"] = 1  # another split of the same setting
    run = Run(cfg, other)
    run.prepare()
    for kind in ("loo",):
        run.groundtruth(kind)
        run.merge(kind)
    foreign = run.p["groundtruth"]["loo"]["merged"]
    with pytest.raises(ProvenanceError, match=r"merged-4\.parquet.*data = .*expected"):
        tiny.evaluate(groundtruth={**_gts(tiny), "loo": foreign})
    # the same file relabelled as another benchmark's
    table, meta = _io.read_parquet(tiny.p["groundtruth"]["loo"]["merged"])
    prov = {**json.loads(meta["provenance"]), "benchmark": "mnist_mlp_smoke"}
    keep = {k: v for k, v in meta.items() if k in ("key", "config", "kind", "shard", "shards")}
    _io.write_parquet(tmp_path / "relabelled.parquet", table, keep, prov)
    with pytest.raises(
        ProvenanceError, match="benchmark = 'mnist_mlp_smoke', expected 'mnist_lr_smoke'"
    ):
        tiny.evaluate(groundtruth={**_gts(tiny), "loo": str(tmp_path / "relabelled.parquet")})


def _gts(run):
    return {k: v["merged"] for k, v in run.p["groundtruth"].items()}


def test_ground_truth_of_the_wrong_kind_is_refused(tiny):
    gts = _gts(tiny)
    with pytest.raises(ProvenanceError, match="kind = 'loo', expected 'lds'"):
        tiny.evaluate(groundtruth={"lds": gts["loo"], "loo": gts["loo"]})


def test_truncated_self_scores_are_refused(tiny):
    p = Path(tiny.p["self_scores"][METHOD])
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(IntegrityError, match=r"self\.parquet.*truncated or corrupted"):
        tiny.evaluate()


def test_scores_of_another_method_are_refused(tiny):
    with pytest.raises(ProvenanceError, match="method = 'grad_dot', expected 'if_cg'"):
        stages_evaluate_as(tiny, "if_cg")


def stages_evaluate_as(run, method):
    from tdabench.pipeline import stages

    cfg = run.cfg
    cfg["attributor_configs"].setdefault(method, cfg["attributor_configs"][METHOD])
    spec = run.spec("evaluate", method=METHOD)
    spec["method"] = method
    p = run.p
    stages.evaluate(
        spec,
        B,
        p["scores"][METHOD],
        p["self_scores"][METHOD],
        _gts(run),
        p["noisy"],
        str(run.results / "m.json"),
        str(run.results / "c.json"),
    )


def test_flipped_model_byte_is_refused_by_attribute(tiny):
    models = Path(tiny.p["models"])
    p = models / "clean-0-ckpt1.safetensors"
    data = bytearray(p.read_bytes())
    data[-7] ^= 0x10  # inside the weights: only the checksum can see it
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"clean-0-ckpt1\.safetensors.*fails its checksum"):
        tiny.attribute()


def test_swapped_models_are_refused_by_attribute(tiny):
    models = Path(tiny.p["models"])
    a, b = models / "clean-0-ckpt1.safetensors", models / "clean-1-ckpt1.safetensors"
    tmp = models / "x"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(IntegrityError, match="but the manifest records"):
        tiny.attribute()


def test_pickled_model_is_refused_unopened(tiny):
    import pickle

    p = Path(tiny.p["models"]) / "clean-0-ckpt1.safetensors"
    p.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        tiny.attribute()


def test_models_from_another_train_spec_are_refused(tiny, tmp_path):
    other = tmp_path / "models"
    shutil.copytree(tiny.p["models"], other)
    man = json.loads((other / "manifest.json").read_text())
    man["provenance"]["spec_hash"] = "000000000000"
    _io.write_json(other / "manifest.json", {k: v for k, v in man.items() if k != "sha256"})
    p = tiny.p
    from tdabench.pipeline import stages

    with pytest.raises(ProvenanceError, match=r"manifest\.json.*spec_hash = '000000000000'"):
        stages.attribute(
            tiny.spec("attribute", method=METHOD),
            p["data"],
            str(other),
            p["scores"][METHOD],
            p["self_scores"][METHOD],
            benchmark=B,
        )


def test_edited_metrics_json_fails_verification(tiny):
    p = Path(tiny.p["metrics"][METHOD])
    body = json.loads(p.read_text())
    body["lds"]["value"] = 0.99
    p.write_text(json.dumps(body))
    with pytest.raises(IntegrityError, match=r"grad_dot\.json.*fails its checksum"):
        _io.verify_output(p.parent)


def test_outputs_are_byte_reproducible(tiny_base, tmp_path):
    again = tmp_path / "results"
    Run(tiny_config(again), again).all()
    files = sorted(
        p.relative_to(tiny_base)
        for p in tiny_base.rglob("*")
        if p.is_file() and not p.name.endswith(".run.json") and "submitit" not in p.parts
    )
    assert len(files) > 15
    differ = [str(f) for f in files if (tiny_base / f).read_bytes() != (again / f).read_bytes()]
    assert differ == []
    # and everything verifies, with the right provenance
    checked = _io.verify_output(again / B, {"benchmark": B})
    assert len(checked) == len([f for f in files if f.parts[0] == B])
