"""Brittleness per attribution method on the MNIST LR setting (``configs/benchmarks/mnist_lr.yaml``).

For a few test digits that the full model classifies correctly, each method ranks the
training digits by its score for that digit; for ``k`` in the search space
(default ``0, 20, ..., 180``, dattri's), a model is retrained without the top ``k`` and the
brittleness is the first ``k`` that makes it misclassify the digit (``None``: none in the
search space). Smaller is better. Retraining goes through the batched trainer of the ground
truth (:func:`tdabench.groundtruth.trainer.make_trainer`, the setting's recipe, one shared
model seed) and :class:`tdabench.metric.BrittlenessRunner`'s keyed, resumable shards, so an
interrupted run resumes where it stopped.

Methods: a random ranking (baseline), Grad-Dot, IF (explicit Hessian, regularization 0.01),
TRAK-1 (projection 512), KNN-Shapley (K=5 on the pixels). Writes
``benchmarks/results/brittleness_mnist_lr.{json,md}``.

    .venv/bin/python benchmarks/brittleness.py [--device cpu] [--n-test 8] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import (
    GradDotAttributor,
    IFAttributorExplicit,
    KNNShapleyAttributor,
    TRAKAttributor,
)
from tdabench.benchmark import get_setting
from tdabench.benchmark.targets import make_loss_func, make_probability_func
from tdabench.groundtruth.trainer import make_trainer, unstack
from tdabench.metric import BrittlenessRunner
from tdabench.task import AttributionTask

RESULTS = Path(__file__).resolve().parent / "results"


def _scores(
    name: str, model: torch.nn.Module, state: dict, data: Any, cols: list[int], device: str
) -> torch.Tensor:
    xtr, ytr = data.train
    xte, yte = data.test[0][cols], data.test[1][cols]
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=500)
    test = DataLoader(TensorDataset(xte, yte), batch_size=len(cols))
    if name == "random":
        g = torch.Generator().manual_seed(0)
        return torch.rand(len(ytr), len(cols), generator=g, dtype=torch.float64)
    if name == "knn_shapley":
        # KNN-Shapley returns dattri's (n_test, n_train) (KNNShapleyAttributor.score_layout)
        return KNNShapleyAttributor(5, device=device).attribute(train, test).T
    task = AttributionTask(make_loss_func(model, "classification"), model, state)
    if name == "grad_dot":
        att = GradDotAttributor(task, device=device)
    elif name == "if_explicit":
        att = IFAttributorExplicit(task, device=device, regularization=0.01)
    else:
        att = TRAKAttributor(
            task,
            make_probability_func(model, "classification"),
            projector_kwargs={"proj_dim": 512},
            device=device,
        )
    att.cache(train)
    return att.attribute(train, test)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-test", type=int, default=8)
    ap.add_argument("--search-space", type=int, nargs="+", default=list(range(0, 200, 20)))
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["random", "grad_dot", "if_explicit", "trak_1", "knn_shapley"],
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--store", type=Path, default=RESULTS / "jobs" / "brittleness"
    )  # gitignored; keyed, resumable
    ap.add_argument("--out", type=Path, default=RESULTS / "brittleness_mnist_lr")
    ap.add_argument("--machine", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    setting = get_setting("mnist_lr")
    data = setting.load(seed=0)
    trainer = make_trainer(setting, data, batched=True, device=args.device)
    t0 = time.perf_counter()
    state = {
        k: v.cpu()
        for k, v in unstack(
            trainer.train(torch.ones(1, trainer.n_train, dtype=torch.bool), [args.seed]), 0
        ).items()
    }
    model = setting.build_model()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        pred = model(data.test[0]).argmax(-1)
    cols = [int(j) for j in torch.nonzero(pred == data.test[1]).flatten()[: args.n_test]]
    template = setting.build_model()

    def predict(st: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        return (functional_call(template, st, (x,)).argmax(-1) == y).to(torch.float32).reshape(())

    rows: dict[str, Any] = {}
    for name in args.methods:
        ts = time.perf_counter()
        scores = _scores(name, model, state, data, cols, args.device)
        t_attr = time.perf_counter() - ts
        runner = BrittlenessRunner(
            trainer,
            predict,
            args.store / name,
            search_space=args.search_space,
            seed=args.seed,
            shard_size=40,
        )
        ts = time.perf_counter()
        out = runner.run(scores, cols)
        b = out["brittleness"]
        found = [k for k in b if k is not None]
        rows[name] = {
            "brittleness": b,
            "n_flipped": len(found),
            "median_flipped_k": statistics.median(found) if found else None,
            "attribute_s": round(t_attr, 2),
            "retrain_s": round(time.perf_counter() - ts, 2),
            "key": out["key"],
        }
        print(name, rows[name])
    res = {
        "setting": f"mnist_lr ({trainer.n_train} train), {len(cols)} correctly classified test digits {cols}",
        "search_space": args.search_space,
        "model_seed": args.seed,
        "device": args.device,
        "machine": args.machine or platform.node(),
        "total_s": round(time.perf_counter() - t0, 1),
        "methods": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        f"Brittleness on {res['setting']}; search space {args.search_space} (smaller = better; "
        "'-' = no k in the search space flips the prediction).",
        "",
        f"| method | flipped (of {len(cols)}) | median k of flipped | per test digit |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        per = " ".join("-" if k is None else str(k) for k in r["brittleness"])
        med = "-" if r["median_flipped_k"] is None else f"{r['median_flipped_k']:g}"
        lines.append(f"| {name} | {r['n_flipped']} | {med} | {per} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
