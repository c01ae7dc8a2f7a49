"""The whole workflow with the REAL stages on a few hundred real MNIST digits: every stage runs,
metrics are finite and sensible, a rerun is a no-op, and raising num_subsets trains only new shards."""

from __future__ import annotations

import json
import math

import pytest
from pipeline_helpers import jobs_scheduled, make_workspace, set_config, snakemake

pytestmark = pytest.mark.slow


def test_real_pipeline_end_to_end(tmp_path, real_env):
    ws = make_workspace(
        tmp_path / "ws",
        attributors=("grad_dot", "if_explicit", "rps"),
        lds_subsets=6,
        loo_indices=4,
    )
    snakemake(ws, timeout=1200)
    for method in ("grad_dot", "if_explicit", "rps"):
        m = json.loads((ws / f"results/metrics/mnist_lr/{method}.json").read_text())
        for kind in ("lds", "loo", "auc"):
            assert math.isfinite(m[kind]["value"]), (method, kind, m)
        assert m["lds"]["ci_low"] <= m["lds"]["value"] <= m["lds"]["ci_high"]
        assert m["lds"]["noise_ceiling"] is not None  # the configs use 2 runs per subset
        assert m["auc"]["value"] > 0.5, m  # self-influence finds flipped labels better than chance
    report = (ws / "results/report.md").read_text()
    assert report.count("| mnist_lr |") == 3
    assert (ws / "results/plots/lds_bars.png").stat().st_size > 0
    # nothing changed: nothing to do
    assert jobs_scheduled(ws) == {}
    # more subsets: only the ground truth's new shards and what depends on them
    set_config(ws, attributors=("grad_dot", "if_explicit", "rps"), lds_subsets=9, loo_indices=4)
    todo = jobs_scheduled(ws)
    assert "train" not in todo and "attribute" not in todo and "prepare" not in todo, todo
    assert todo.get("groundtruth") == 1, todo
    snakemake(ws, timeout=600)
    complete = next(ws.glob("results/mnist_lr/groundtruth/lds/*/complete-9.json"))
    summary = json.loads(complete.with_name(complete.name + ".run.json").read_text())  # run facts
    assert summary["skipped"] == [0, 1] and summary["ran"] == [2], summary
