"""The Snakemake workflow end to end with the toy stages: incremental behaviour and no-op reruns."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import (
    jobs_scheduled,
    make_workspace,
    set_config,
    snakemake,
    trace_lines,
)

pytestmark = pytest.mark.slow


def _summary(path):
    """complete-<n>.json and its sidecar (the run's facts: shards ran/skipped, attempts)."""
    return {
        **json.loads(path.read_text()),
        **json.loads(path.with_name(path.name + ".run.json").read_text()),
    }


def _complete(ws, kind):
    (path,) = ws.glob(f"results/mnist_lr/groundtruth/{kind}/*/complete-*[0-9].json")
    return path, _summary(path)


def test_incremental_workflow(tmp_path, toy_env):
    ws = make_workspace(tmp_path / "ws")
    snakemake(ws)
    first = trace_lines(toy_env)
    assert sorted(line.split()[0] for line in first) == sorted(
        [
            "prepare",
            "train",
            "groundtruth",
            "groundtruth",
            "merge",
            "merge",
            "attribute",
            "evaluate",
            "report",
        ]
    )
    assert (ws / "results/report.md").read_text().count("| mnist_lr | grad_dot |") == 1
    assert (ws / "results/plots/lds_bars.png").stat().st_size > 0
    assert jobs_scheduled(ws) == {}  # a rerun is a no-op
    lds_path, lds = _complete(ws, "lds")
    assert lds["ran"] == [0, 1] and lds["skipped"] == []

    # adding an attributor runs only its attribute + evaluate jobs (and the report)
    set_config(ws, attributors=("grad_dot", "if_cg"))
    assert jobs_scheduled(ws) == {"attribute": 1, "evaluate": 1, "report": 1, "all": 1}
    snakemake(ws)
    assert sorted(trace_lines(toy_env)) == [
        "attribute mnist_lr if_cg",
        "evaluate mnist_lr if_cg",
        "report",
    ]

    # raising num_subsets 6 -> 9 trains only the new shard, in the same store
    set_config(ws, attributors=("grad_dot", "if_cg"), lds_subsets=9)
    snakemake(ws)
    ran = trace_lines(toy_env)
    assert "groundtruth mnist_lr lds 9" in ran and not any(
        r.startswith(("train", "attribute", "prepare")) for r in ran
    )
    path9 = lds_path.parent / "complete-9.json"
    more = _summary(path9)
    assert more["skipped"] == [0, 1] and more["ran"] == [2]
    assert more["key"] == lds["key"]

    # a training hyper-parameter changes the key: a new store, never mixed with the old one
    set_config(ws, attributors=("grad_dot", "if_cg"), lds_subsets=9, lr=0.5)
    snakemake(ws)
    stores = sorted(p.name for p in (ws / "results/mnist_lr/groundtruth/lds").iterdir())
    assert len(stores) == 2
    new = [
        p for p in (ws / "results/mnist_lr/groundtruth/lds").glob("*/complete-9.json") if p != path9
    ]
    assert _summary(new[0])["ran"] == [0, 1, 2]
    assert _summary(path9)["ran"] == [2]  # the old store is untouched


def test_cli_check_config(tmp_path, toy_env):
    ws = make_workspace(tmp_path / "ws")
    from pipeline_helpers import BIN, run

    out = run([str(BIN / "python"), "-m", "tdabench.pipeline", "check-config"], ws).stdout
    assert "configs/default.yaml: OK" in out and "mnist_lr (setting mnist_lr" in out
    bad = ws / "configs/attributors/grad_dot.yaml"
    bad.write_text(bad.read_text() + "\nbatchsize: 3\n")
    import subprocess

    res = subprocess.run(
        [str(BIN / "python"), "-m", "tdabench.pipeline", "check-config"],
        cwd=ws,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "grad_dot.yaml" in res.stderr and "'batchsize'" in res.stderr
    # Snakemake fails before scheduling anything, with the same message
    res = subprocess.run(
        [str(BIN / "snakemake"), "-n", "--cores", "1"], cwd=ws, capture_output=True, text=True
    )
    assert res.returncode != 0 and "unknown key 'batchsize'" in res.stdout + res.stderr
