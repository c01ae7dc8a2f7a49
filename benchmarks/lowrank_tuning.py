"""Hyper-parameters of DataInf, LoGra and FactGraSS chosen on HELD-OUT ground truth (issue 12).

    .venv/bin/python benchmarks/lowrank_tuning.py [--models lr mlp] [--methods datainf logra factgrass]

1. Builds (once, cached under ``benchmarks/results/jobs/heldout_gt/``) a held-out LDS ground truth
   per model: ``--heldout-subsets`` random halves drawn from seeds ``HELDOUT_SEED + s`` (the
   evaluation ground truth of benchmarks/common.py uses ``GT_SPEC['seed'] + s``, 2000..2049; these
   use 7000.., so no subset is shared), one model each, same recipe, target -loss.
2. For each method, scores every configuration of a small grid (damping / regularization,
   projection rank) with tdabench on the harness checkpoint (one thread) and computes its LDS on
   the held-out subsets only.
3. Picks the configuration with the best held-out LDS and only then computes its LDS on the
   evaluation ground truth (``gt_{model}.safetensors``), which no choice ever looked at.

Writes ``benchmarks/results/lowrank_tuning.{json,md}``. The chosen values are the ``*_tuned``
rows of ``benchmarks.common.METHODS`` (compare.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

HELDOUT_SEED = 7000
HELDOUT_MODEL_SEED = 8000
HELDOUT_DIR = common.RESULTS_DIR / "jobs" / "heldout_gt"

# (label, class name, constructor kwargs); the layer restriction follows common.METHODS
GRID: dict[str, list[dict[str, Any]]] = {
    "datainf": [{"regularization": 0.0, "regularization_scale": s} for s in (0.1, 0.01, 1.0, 10.0)]
    + [{"regularization": r} for r in (1e-3, 1e-2, 0.1, 1.0)],
    "logra": [
        {"proj_dim": 4096, "damping": d} for d in (1e-5, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
    ]
    + [{"proj_dim": k, "damping": d} for k in (1024, 16384) for d in (0.1, 1.0, 10.0)],
    "factgrass": [
        {"proj_dim": 4096, "blowup_factor": 4, "damping": d}
        for d in (1e-5, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
    ]
    + [
        {"proj_dim": k, "blowup_factor": 4, "damping": d}
        for k in (1024, 16384)
        for d in (0.1, 1.0, 10.0)
    ],
}
CLASSES = {
    "datainf": "IFAttributorDataInf",
    "logra": "LoGraAttributor",
    "factgrass": "FactGraSSAttributor",
}


def heldout_ground_truth(model_name: str, num_subsets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values (S, n_test), indices (S, n_train/2))`` of the held-out subsets (built once)."""
    data = common.load_data()
    spec = {
        "num_subsets": num_subsets,
        "subset_ratio": 0.5,
        "seed": HELDOUT_SEED,
        "model_seed_offset": HELDOUT_MODEL_SEED,
    }
    key = common._fingerprint({"model": model_name, "data": common.data_sha256(), "gt": spec})
    path = HELDOUT_DIR / f"gt_{model_name}_heldout.safetensors"
    if path.is_file() and common.read_safetensors(path)[1].get("key") == key:
        return common.load_ground_truth(path)
    t0 = time.perf_counter()
    k = int(common.N_TRAIN * spec["subset_ratio"])
    rows = [
        torch.randperm(common.N_TRAIN, generator=torch.Generator().manual_seed(HELDOUT_SEED + s))[
            :k
        ]
        .sort()
        .values
        for s in range(num_subsets)
    ]
    seeds = [HELDOUT_MODEL_SEED + s for s in range(num_subsets)]
    values = []
    for c in range(0, num_subsets, 25):
        states, _ = common.train_many(
            model_name, data["x_train"], data["y_train"], rows[c : c + 25], seeds[c : c + 25]
        )
        values += [
            common.evaluate(model_name, st, data["x_test"], data["y_test"])["neg_loss"]
            for st in states
        ]
    HELDOUT_DIR.mkdir(parents=True, exist_ok=True)
    common.write_safetensors(
        {"indices": torch.stack(rows), "neg_loss": torch.stack(values).float()},
        path,
        {"key": key, "spec": json.dumps(spec), "model": model_name},
    )
    print(
        f"[tuning] {model_name}: held-out ground truth ({num_subsets} subsets) in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    return common.load_ground_truth(path)


def run_config(
    model_name: str, method: str, kwargs: dict[str, Any], dl: dict[str, Any], device: str = "cpu"
) -> tuple[torch.Tensor, float]:
    """Scores ``(n_train, n_test)`` of one configuration and the seconds of cache + attribute."""
    import tdabench.algorithm as alg
    from tdabench.task import AttributionTask

    model = common.build_model(model_name)
    model.eval()
    ckpt = common.read_safetensors(common.CACHE_DIR / f"{model_name}_final.safetensors")[0]
    task = AttributionTask(common.make_loss_func(model), model, ckpt)
    layer = common.layer_names(model_name, common.METHODS[method]["layer"][model_name])
    where = {"layer_name": layer} if method == "datainf" else {"layer_names": layer}
    att = getattr(alg, CLASSES[method])(task, device=device, **where, **kwargs)
    t0 = time.perf_counter()
    att.cache(dl["cache"])
    scores = att.attribute(dl["train"], dl["test"]).cpu()
    return scores, time.perf_counter() - t0


def tune(
    model_name: str,
    method: str,
    heldout: tuple[torch.Tensor, torch.Tensor],
    evaluation: tuple[torch.Tensor, torch.Tensor],
    device: str = "cpu",
) -> dict[str, Any]:
    data = common.load_data()
    dl = common.loaders(data, common.METHODS[method]["batches"])
    trials = []
    for kwargs in GRID[method]:
        if (
            model_name == "mlp" and kwargs.get("proj_dim", 0) > 4096
        ):  # a 16384^2 Fisher per layer: minutes per trial
            continue
        scores, secs = run_config(model_name, method, kwargs, dl, device)
        finite = bool(torch.isfinite(scores).all())
        lds_h = common.lds(scores, *heldout)[0] if finite else float("nan")
        trials.append({"hparams": kwargs, "lds_heldout": lds_h, "seconds": secs, "finite": finite})
        print(
            f"[tuning] {model_name} {method} {kwargs}: held-out LDS {lds_h:.3f} ({secs:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    best = max(
        (t for t in trials if t["lds_heldout"] == t["lds_heldout"]), key=lambda t: t["lds_heldout"]
    )
    scores, _ = run_config(model_name, method, best["hparams"], dl, device)
    return {
        "model": model_name,
        "method": method,
        "trials": trials,
        "chosen": best["hparams"],
        "chosen_lds_heldout": best["lds_heldout"],
        "chosen_lds_eval": common.lds(scores, *evaluation)[0],
    }


def render(results: list[dict[str, Any]], num_subsets: int) -> str:
    lines = [
        "| model | method | chosen on held-out | held-out LDS | evaluation LDS | grid (held-out LDS) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        grid = "; ".join(f"{_short(t['hparams'])}: {t['lds_heldout']:.3f}" for t in r["trials"])
        lines.append(
            f"| {r['model']} | {r['method']} | {_short(r['chosen'])} | {r['chosen_lds_heldout']:.3f} | "
            f"{r['chosen_lds_eval']:.3f} | {grid} |"
        )
    return "\n".join(lines) + (
        f"\n\nHeld-out: {num_subsets} random halves (seeds {HELDOUT_SEED}+s, disjoint from the evaluation subsets "
        f"{common.GT_SPEC['seed']}+s), target -loss. The evaluation LDS is computed only for the chosen configuration."
    )


def _short(h: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(common.MODELS), choices=list(common.MODELS))
    p.add_argument("--methods", nargs="+", default=list(GRID), choices=list(GRID))
    p.add_argument("--heldout-subsets", type=int, default=30)
    p.add_argument("--device", default="cpu", help="where the attributors run (cpu, cuda)")
    args = p.parse_args(argv)
    common.one_thread()
    out_path = common.RESULTS_DIR / "lowrank_tuning.json"
    old = json.loads(out_path.read_text())["results"] if out_path.is_file() else []
    results = []
    for m in args.models:
        common.prepare_checkpoints(m)
        heldout = heldout_ground_truth(m, args.heldout_subsets)
        evaluation = common.load_ground_truth(common.prepare_ground_truth(m))
        results += [tune(m, meth, heldout, evaluation, args.device) for meth in args.methods]
    fresh = {(r["model"], r["method"]) for r in results}
    results = [r for r in old if (r["model"], r["method"]) not in fresh] + results
    table = render(results, args.heldout_subsets)
    print(table)
    out_path.write_text(
        json.dumps(
            {
                "results": results,
                "heldout_subsets": args.heldout_subsets,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
            indent=1,
        )
    )
    (common.RESULTS_DIR / "lowrank_tuning.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
