"""The brittleness pipeline stage: config key, paths, spec, CLI, and one run on the smoke setting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tdabench.errors import ConfigError
from tdabench.metric import BrittlenessRunner  # noqa: F401  (the stage's engine)
from tdabench.pipeline.config import load_config, paths, spec_hash, stage_spec

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, brittleness: dict | None = None) -> dict:
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    b = yaml.safe_load((configs / "benchmarks" / "mnist_lr_smoke.yaml").read_text())
    b["metrics"] = ["lds", "brittleness"]
    if brittleness is not None:
        b["brittleness"] = brittleness
    (configs / "benchmarks" / "brit.yaml").write_text(yaml.safe_dump(b))
    over = {
        "configs_dir": str(configs),
        "benchmarks": ["brit"],
        "attributors": ["grad_dot"],
        "results_dir": str(tmp_path / "results"),
    }
    return load_config(REPO / "configs/default.yaml", over)


def test_config_paths_and_spec(tmp_path):
    cfg = _cfg(tmp_path)
    br = cfg["benchmark_configs"]["brit"]["brittleness"]
    assert br == {
        "num_test": 8,
        "search_space": list(range(0, 200, 20)),
        "seed": 0,
        "shard_size": 8,
    }
    spec = stage_spec(cfg, "brittleness", "brit", method="grad_dot")
    assert spec["attribute"] == stage_spec(cfg, "attribute", "brit", method="grad_dot")
    p = paths(cfg, "brit")["brittleness"]["grad_dot"]
    assert p["out"].endswith("brittleness/brit/grad_dot.json") and p["store"].endswith(
        spec_hash(spec)
    )
    # not in the metrics: no path, and the other stages' hashes do not depend on the key
    plain = load_config(REPO / "configs/default.yaml", {"benchmarks": ["mnist_lr_smoke"]})
    assert "brittleness" not in paths(plain, "mnist_lr_smoke")
    with pytest.raises(ConfigError):
        _cfg(tmp_path / "bad", {"num_test": 0})


def test_stage_runs_resumes_and_refuses_other_scores(tmp_path):
    from tdabench.errors import ProvenanceError
    from tdabench.pipeline.io import write_scores
    from tdabench.pipeline.stages import brittleness
    from tdabench.pipeline.stages._common import data_fingerprint, load

    cfg = _cfg(tmp_path, {"num_test": 2, "search_space": [0, 150, 300], "seed": 0, "shard_size": 2})
    spec = stage_spec(cfg, "brittleness", "brit", method="grad_dot")
    _, data = load(spec["attribute"]["train"])
    n_train, n_test = len(data.train[-1]), 5
    # scores that rank each test digit's own class first: removing them should flip predictions
    y = data.train[-1].numpy()
    scores = np.stack(
        [
            (y == int(data.test[-1][j])).astype(np.float32) + 1e-3 * np.arange(n_train) / n_train
            for j in range(n_test)
        ],
        axis=1,
    )
    prov = {"benchmark": "brit", "method": "grad_dot", "data": data_fingerprint(data.meta)}
    path = tmp_path / "scores.parquet"
    write_scores(path, scores, {"method": "grad_dot"}, prov)
    out, store = tmp_path / "b.json", tmp_path / "store"
    brittleness(spec, "brit", str(path), str(out), str(store), "cpu")
    res = json.loads(out.read_text())
    b = res["brittleness"]
    assert len(b["test_indices"]) == 2 and b["search_space"] == [0, 150, 300]
    assert all(
        k in (None, 150, 300) for k in b["brittleness"]
    )  # the full model (k=0) is right on them
    assert any(
        k is not None for k in b["brittleness"]
    )  # removing a class's top samples flips a digit
    assert res["provenance"]["stage"] == "brittleness"
    shards = sorted((store / "shards").glob("*.parquet"))
    assert len(shards) == 3
    stamp = [s.stat().st_mtime_ns for s in shards]
    brittleness(spec, "brit", str(path), str(out), str(store), "cpu")  # resume: nothing retrained
    assert [s.stat().st_mtime_ns for s in shards] == stamp
    assert json.loads(out.read_text())["brittleness"] == b
    other = tmp_path / "other.parquet"
    write_scores(other, scores, {"method": "if_cg"}, {**prov, "method": "if_cg"})
    with pytest.raises(ProvenanceError):
        brittleness(spec, "brit", str(other), str(out), str(store), "cpu")


def test_cli_has_the_stage():
    from tdabench.pipeline.cli import build_parser

    a = build_parser().parse_args(
        ["brittleness", "--benchmark", "b", "--method", "m", "--store", "s", "--out", "o"]
    )
    assert a.command == "brittleness" and a.store == "s"
