"""The train stage: TracIn checkpoints are snapshots of one run (epoch callback), equal to
separately trained shorter runs for a constant learning rate; recipes with ``max_iters`` get
their checkpoints from the epochs the stream actually runs."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from tdabench.pipeline import stages
from tdabench.pipeline.config import load_yaml, resolve_config, stage_spec


def _spec(recipe: dict, tmp_path) -> dict:
    cfg = resolve_config({**load_yaml("configs/default.yaml"), "benchmarks": ["mnist_lr_smoke"]})
    cfg["benchmark_configs"]["mnist_lr_smoke"]["recipe"] = recipe
    cfg["benchmark_configs"]["mnist_lr_smoke"]["overrides"] = {"n_train": 120, "n_test": 10}
    cfg["benchmark_configs"]["mnist_lr_smoke"]["train"].update(ensemble=2, checkpoints=3)
    prep = stage_spec(cfg, "prepare", "mnist_lr_smoke")
    stages.prepare(prep, str(tmp_path / "data"))
    return stage_spec(cfg, "train", "mnist_lr_smoke")


@pytest.mark.parametrize(
    "recipe", [{"epochs": 6}, {"epochs": 1, "max_iters": 22}], ids=["epochs", "max_iters"]
)
def test_train_stage_snapshots(tmp_path, recipe):
    spec = _spec(recipe, tmp_path)
    stages.train(spec, str(tmp_path / "data"), str(tmp_path / "models"))
    man = json.loads((tmp_path / "models/manifest.json").read_text())
    # 120 samples, batch 32 -> 4 iterations per epoch; max_iters 22 -> 6 epochs (the last partial)
    assert man["epochs"] == [2, 4, 6]
    assert [len(f) for f in man["files"]["clean"]] == [3, 1]
    assert [len(f) for f in man["files"]["noisy"]] == [3]
    ck = [load_file(str(tmp_path / "models" / f)) for f in man["files"]["clean"][0]]
    assert all(
        (a["linear.weight"] - b["linear.weight"]).abs().max() > 0 for a, b in itertools.pairwise(ck)
    )
    if "max_iters" in recipe:
        return
    # the epoch-2 snapshot equals a separate 2-epoch training (constant lr, same seed and stream)
    short = _spec({"epochs": 2}, tmp_path / "short")
    stages.train(short, str(tmp_path / "short/data"), str(tmp_path / "short/models"))
    short_man = json.loads((tmp_path / "short/models/manifest.json").read_text())
    assert short_man["epochs"] == [1, 2]
    ref = load_file(str(tmp_path / "short/models" / short_man["files"]["clean"][0][-1]))
    for k in ref:
        torch.testing.assert_close(ck[0][k], ref[k], rtol=0, atol=1e-6)
