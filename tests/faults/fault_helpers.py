"""Helpers of the fault tests: a tiny real pipeline run (120 MNIST digits, the real stages)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdabench.pipeline import stages
from tdabench.pipeline.config import load_yaml, paths, resolve_config, stage_spec

REPO = Path(__file__).resolve().parents[2]
B = "mnist_lr_smoke"
METHOD = "grad_dot"


def tiny_config(results: Path, attributors: list[str] | None = None) -> dict[str, Any]:
    """The default config on 120 digits of mnist_lr_smoke, results under ``results``."""
    raw = {
        **load_yaml(REPO / "configs/default.yaml"),
        "benchmarks": [B],
        "attributors": attributors or [METHOD],
    }
    cfg = resolve_config(raw, base_dir=REPO)
    cfg["results_dir"] = str(results)
    cfg["evaluate"]["bootstrap"] = 50
    b = cfg["benchmark_configs"][B]
    b["overrides"] = {"n_train": 120, "n_test": 12}
    b["recipe"] = {"epochs": 2}
    b["train"].update(ensemble=2, checkpoints=2)
    b["groundtruth"]["lds"].update(num_subsets=8, shard_size=4, num_runs_per_subset=2)
    b["groundtruth"]["loo"].update(num_indices=4, shard_size=2)
    return cfg


@dataclass
class Run:
    """Specs and paths of a tiny run rooted at ``results``."""

    cfg: dict[str, Any]
    results: Path

    @property
    def p(self) -> dict[str, Any]:
        return paths(self.cfg, B)

    def spec(self, stage: str, **sel: Any) -> dict[str, Any]:
        return stage_spec(self.cfg, stage, B, **sel)

    def prepare(self) -> None:
        stages.prepare(self.spec("prepare"), self.p["data"], benchmark=B)

    def train(self, **kw: Any) -> None:
        stages.train(self.spec("train"), self.p["data"], self.p["models"], benchmark=B, **kw)

    def groundtruth(self, kind: str) -> None:
        g = self.p["groundtruth"][kind]
        launcher = {"kind": "debug", "folder": str(self.results / "submitit"), "max_retries": 0}
        stages.groundtruth(
            self.spec("groundtruth", kind=kind),
            g["count"],
            g["dir"],
            g["complete"],
            launcher=launcher,
            benchmark=B,
        )

    def merge(self, kind: str) -> None:
        g = self.p["groundtruth"][kind]
        stages.merge(self.spec("merge", kind=kind), g["complete"], g["merged"], benchmark=B)

    def attribute(self, method: str = METHOD, **kw: Any) -> None:
        p = self.p
        stages.attribute(
            self.spec("attribute", method=method),
            p["data"],
            p["models"],
            p["scores"][method],
            p["self_scores"][method],
            metrics=["lds", "loo", "auc"],
            benchmark=B,
            **kw,
        )

    def evaluate(self, method: str = METHOD, **overrides: Any) -> dict[str, Any]:
        p = self.p
        args = {
            "scores": p["scores"][method],
            "self_scores": p["self_scores"][method],
            "groundtruth": {k: v["merged"] for k, v in p["groundtruth"].items()},
            "noisy": p["noisy"],
            "out": p["metrics"][method],
            "curves_out": str(self.results / B / "plots" / f"{method}.json"),
            **overrides,
        }
        stages.evaluate(self.spec("evaluate", method=method), B, **args)
        return json.loads(Path(args["out"]).read_text())

    def all(self) -> None:
        self.prepare()
        self.train()
        for kind in ("lds", "loo"):
            self.groundtruth(kind)
            self.merge(kind)
        self.attribute()
        self.evaluate()
