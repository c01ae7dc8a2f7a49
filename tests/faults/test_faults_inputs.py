"""Issue 14 "should be fixed": typed errors naming the problem and the fix, before work starts.

check-config builds every benchmark's and attributor's arguments (nothing runs); the stage CLI
checks its arguments (benchmark, spec, paths, device) before loading anything.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
from fault_helpers import METHOD, REPO, B, tiny_config

from tdabench.errors import ConfigError
from tdabench.pipeline.cli import main
from tdabench.pipeline.stages.check import check_config

ALL = sorted(p.stem for p in (REPO / "configs/attributors").glob("*.yaml"))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("cfg"), attributors=ALL)


def _with_attr(cfg, method, **params):
    c = copy.deepcopy(cfg)
    a = c["attributor_configs"][method]
    a["params"] = {**a["params"], **params}
    c["benchmark_configs"][B]["attributors"] = [method]
    return c


@pytest.mark.parametrize(
    ("method", "params", "match"),
    [
        ("if_cg", {"max_iter": -1}, "max_iter"),
        ("if_explicit", {"regularization": -0.5}, "regularization"),
        ("if_cg", {"maxiter": 3}, r"unknown .*maxiter.*valid keys"),
        ("grad_dot", {"proj_dims": 3}, r"unknown .*proj_dims"),
        ("if_lissa", {"recursion_depth": 10**12}, r"recursion_depth=1e\+12 means .* passes"),
    ],
)
def test_check_config_rejects_bad_attributor_arguments(cfg, method, params, match):
    c = _with_attr(cfg, method, **params)
    with pytest.raises(ConfigError, match=match) as exc:
        check_config(c)
    assert f"attributors/{method}.yaml" in str(exc.value)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"overrides": {"n_train": -5}}, "n_train"),
        ({"overrides": {"n_trian": 5}}, "n_trian"),
        ({"recipe": {"lr": float("inf")}}, "finite learning rate"),
        ({"recipe": {"lrr": 0.1}}, "unknown override 'lrr'"),
    ],
)
def test_check_config_rejects_bad_benchmark_arguments(cfg, override, match):
    c = copy.deepcopy(cfg)
    c["benchmark_configs"][B].update(override)
    with pytest.raises(ConfigError, match=match) as exc:
        check_config(c)
    assert f"benchmarks/{B}.yaml" in str(exc.value)


def test_check_config_warns_about_slow_lissa(cfg):
    c = _with_attr(cfg, "if_lissa", recursion_depth=1000, batch_size=64)  # 533 passes
    (w,) = check_config(c)
    assert "recursion_depth=1000" in w and "533" in w


def test_check_config_accepts_every_shipped_attributor(cfg):
    c = copy.deepcopy(cfg)
    c["benchmark_configs"][B]["attributors"] = ALL  # the benchmark's own list would narrow it
    warnings = check_config(c)  # on 120 digits, LiSSA's 500 x 64 samples are 267 passes
    assert len(warnings) == 2 and all("if_lissa" in w and "267 passes" in w for w in warnings)


def _cli(caplog, *argv):
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="tdabench.pipeline.cli"):
        rc = main(list(argv))
    return rc, caplog.text


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_cli_unknown_benchmark(in_repo, caplog):
    rc, log = _cli(caplog, "prepare", "--benchmark", "nope")
    assert rc == 2 and "ConfigError" in log and "'nope'" in log


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("{not json", "not readable JSON"),
        (
            json.dumps({"stage": "train", "recipe": {}}),
            r"not a complete train spec.*missing keys \['prepare', 'train'\]",
        ),
        ("@/nowhere/spec.json", "not readable JSON"),
    ],
)
def test_cli_malformed_or_incomplete_spec(in_repo, caplog, spec, match):
    rc, log = _cli(caplog, "train", "--spec", spec, "--data", "d", "--out-dir", "o")
    assert rc == 2 and "ConfigError" in log
    assert __import__("re").search(match, log), log


def test_cli_paths_required_with_spec(in_repo, caplog, tiny):
    spec = json.dumps(tiny.spec("merge", kind="lds"))
    rc, log = _cli(caplog, "merge", "--spec", spec, "--out", "x.parquet")
    assert rc == 2 and "--complete is required with --spec" in log


def test_cli_report_metrics_garbage_and_missing(in_repo, caplog, tmp_path):
    rc, log = _cli(caplog, "report", "--metrics", "garbage", "--out-md", str(tmp_path / "r.md"))
    assert rc == 2 and "expected BENCHMARK:METHOD=PATH" in log
    rc, log = _cli(
        caplog,
        "report",
        "--metrics",
        f"b:m={tmp_path}/none.json",
        "--out-md",
        str(tmp_path / "r.md"),
    )
    assert rc == 2 and "IntegrityError" in log and "none.json" in log and "does not exist" in log


def test_cli_models_nowhere_and_device_tpu(in_repo, caplog, tiny):
    p = tiny.p
    spec = json.dumps(tiny.spec("attribute", method=METHOD))
    common = [
        "attribute",
        "--benchmark",
        B,
        "--spec",
        spec,
        "--data",
        p["data"],
        "--out",
        str(tiny.results / "s.parquet"),
        "--out-self",
        str(tiny.results / "t.parquet"),
    ]
    rc, log = _cli(caplog, *common, "--models", "/nowhere")
    assert rc == 2 and "/nowhere/manifest.json" in log and "rerun the train stage" in log
    rc, log = _cli(caplog, *common, "--models", p["models"], "--device", "tpu")
    assert rc == 2 and "--device 'tpu'" in log and "use auto, cpu, cuda" in log


def test_cli_truncated_self_scores(in_repo, caplog, tiny):
    from pathlib import Path

    p = tiny.p
    s = Path(p["self_scores"][METHOD])
    s.write_bytes(s.read_bytes()[:100])
    spec = json.dumps(tiny.spec("evaluate", method=METHOD))
    gts = [f"--gt={k}={v['merged']}" for k, v in p["groundtruth"].items()]
    rc, log = _cli(
        caplog,
        "evaluate",
        "--benchmark",
        B,
        "--spec",
        spec,
        "--scores",
        p["scores"][METHOD],
        "--self-scores",
        str(s),
        *gts,
        "--noisy",
        p["noisy"],
        "--out",
        str(tiny.results / "m.json"),
        "--curves-out",
        str(tiny.results / "c.json"),
    )
    assert rc == 2 and "IntegrityError" in log and "self.parquet" in log
