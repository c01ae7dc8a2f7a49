"""FactGraSS (and LoGra) with dattri's defaults over several projection seeds: tdabench vs dattri 0.3.0.

    .venv/bin/python benchmarks/factgrass_seeds.py [--model lr] [--methods factgrass logra]
        [--seeds 0 1 2 3 4] [--dattri-python /work/peers/dattri/bin/python] [--sides ours dattri]

Both libraries draw their random masks / projections from a seed; one run per library is one
draw, so one LDS per side says little when the two sides' scores agree only ~0.3 (compare.py).
Here every seed is one job in a fresh one-thread process, same checkpoint, loaders and
evaluation ground truth as compare.py's ``factgrass`` / ``logra`` rows (dattri's defaults:
every Linear layer, eFIM, damping None = 1e-5 x mean eigenvalue, proj_dim 4096, blowup 4):

* ours: ``FactGraSSAttributor(..., seed=s)`` / ``LoGraAttributor(..., seed=s)``;
* dattri: ``BlockProjectedIFAttributor`` with exactly the sparsifier / projector keyword
  arguments its ``FactGraSSAttributor`` / ``LoGraAttributor`` pass (read from dattri 0.3.0's
  ``algorithm/factgrass.py`` / ``logra.py``) plus ``proj_seed=s`` (their wrappers fix the seed
  to 0; seed 0 is their default run).

Reports, per side, the LDS mean +- sd over the seeds, the mean agreement (Pearson per test
column) between two seeds of the same side, and between the sides at the same seed.
Writes ``benchmarks/results/factgrass_seeds.{json,md}``; ``--dattri-job JOB.json`` is the
dattri-side job (run inside dattri's virtualenv).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch


def _dattri_kwargs(method: str, hp: dict[str, Any], seed: int, dev: str) -> dict[str, Any]:
    """dattri 0.3.0's wrapper configuration of ``BlockProjectedIFAttributor`` with ``proj_seed``."""
    proj = {"device": dev, "proj_max_batch_size": 64, "proj_seed": seed}
    if method == "factgrass":
        side = math.isqrt(hp["proj_dim"] * hp["blowup_factor"])
        sparsifier = {**proj, "proj_dim": side, "proj_type": "random_mask"}
        projector = {
            **proj,
            "proj_dim": hp["proj_dim"],
            "proj_type": "sjlt" if dev == "cuda" else "normal",
        }
    else:  # LoGra: a factorised Gaussian sparsifier, identity projector
        side = math.isqrt(hp["proj_dim"])
        sparsifier = {**proj, "proj_dim": side, "proj_type": "normal"}
        projector = {**proj, "proj_dim": -1, "proj_type": "identity"}
    return {"sparsifier_kwargs": sparsifier, "projector_kwargs": projector}


def run_dattri_job(job: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Inside dattri's venv: the block-projected attributor with the wrapper's kwargs + seed."""
    from dattri.algorithm.block_projected_if import BlockProjectedIFAttributor
    from dattri.task import AttributionTask

    model = common.build_model(job["model"])
    model.eval()
    flat_forward = model.forward  # as benchmarks/peers/dattri_attribute.py: dattri's setup
    model.forward = lambda x: flat_forward(
        x.reshape(-1, x.shape[-1])
    )  # passes one unbatched sample

    def model_loss(m: Any, batch: Any, device: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(m(x.to(device)), y.to(device))

    hp = job["hparams"]
    task = AttributionTask(
        loss_func=model_loss, model=model, checkpoints=common.load_checkpoints(job)[0]
    )
    att = BlockProjectedIFAttributor(
        task=task,
        layer_names=None,
        hessian=hp["hessian"],
        damping=hp["damping"],
        device="cpu",
        offload=hp["offload"],
        **_dattri_kwargs(job["method"], hp, job["seed"], "cpu"),
    )
    dl = common.loaders(common.load_data(Path(job["cache_dir"])), job["batches"])
    common.warm_torch()
    t0 = time.perf_counter()
    att.cache(dl["cache"])
    scores = att.attribute(dl["train"], dl["test"])
    return scores, time.perf_counter() - t0


def run_ours(
    method: str, model_name: str, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, float]:
    """Our attributor with compare.py's row ``method`` and ``seed``, in this process."""
    from tdabench.algorithm import FactGraSSAttributor, LoGraAttributor
    from tdabench.task import AttributionTask

    spec = common.METHODS[method]
    model = common.build_model(model_name)
    model.eval()
    ckpt = common.read_safetensors(common.CACHE_DIR / f"{model_name}_final.safetensors")[0]
    task = AttributionTask(common.make_loss_func(model), model, ckpt)
    cls = FactGraSSAttributor if method == "factgrass" else LoGraAttributor
    att = cls(task, layer_names=None, seed=seed, device=device, **spec["hparams"])
    dl = common.loaders(common.load_data(), spec["batches"])
    t0 = time.perf_counter()
    att.cache(dl["cache"])
    scores = att.attribute(dl["train"], dl["test"])
    common.sync_device(device)
    return scores.cpu(), time.perf_counter() - t0


def _dattri_side(args: argparse.Namespace, method: str, seed: int, jobs: Path) -> dict[str, Any]:
    """One dattri job in its venv (fresh process); the result JSON (``scores_path`` when ok)."""
    spec = common.METHODS[method]
    stem = jobs / f"dattri_{args.model}_{method}_s{seed}"
    job = {
        "side": "dattri",
        "method": method,
        "model": args.model,
        "seed": seed,
        "hparams": spec["hparams"],
        "batches": spec["batches"],
        "checkpoint_paths": [str(common.CACHE_DIR / f"{args.model}_final.safetensors")],
        "cache_dir": str(common.CACHE_DIR),
        "scores_path": f"{stem}.scores.safetensors",
        "result_path": f"{stem}.result.json",
        "job_path": f"{stem}.job.json",
        "log_path": f"{stem}.log",
    }
    cmd = [args.dattri_python, str(Path(__file__).resolve()), "--dattri-job"]
    return common.run_job(cmd, job, args.timeout)


def _summary(
    scores: dict[int, torch.Tensor], gt: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    lds = {s: common.lds(v, *gt)[0] for s, v in scores.items()}
    pairs = [
        common.column_agreement(scores[a], scores[b]) for a, b in itertools.combinations(scores, 2)
    ]
    vals = list(lds.values())
    return {
        "lds": lds,
        "lds_mean": statistics.fmean(vals) if vals else None,
        "lds_sd": statistics.stdev(vals) if len(vals) > 1 else None,
        "seed_agreement": statistics.fmean(pairs) if pairs else None,
    }


def _dattri_job_main(path: str) -> int:
    job = json.loads(Path(path).read_text())
    common.one_thread()
    result: dict[str, Any] = {"side": "dattri", "method": job["method"], "ok": False}
    try:
        scores, seconds = run_dattri_job(job)
        result.update(ok=True, time_total=seconds)
        common.finish_job(job, result, scores)
        return 0
    except Exception as exc:  # reported in the result, as the other peer runners
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
        common.finish_job(job, result, None)
        return 1


def render(out: dict[str, Any]) -> str:
    f = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "| model | method | side | seeds | LDS per seed | LDS mean | LDS sd | agreement between seeds | time per run (s) |",
        "|" + "---|" * 9,
    ]
    for r in out["rows"]:
        per = ", ".join(f"{s}: {v:.3f}" for s, v in r["lds"].items())
        lines.append(
            f"| {r['model']} | {r['method']} | {r['side']} | {len(r['lds'])} | {per} | {f(r['lds_mean'])} | "
            f"{f(r['lds_sd'])} | {f(r['seed_agreement'])} | {f(r['time_mean'], '.1f')} |"
        )
    lines.append("")
    lines += [
        f"- {c['model']} {c['method']}: agreement ours vs dattri at the same seed (different generators, so "
        f"independent draws) {f(c['cross_agreement'])}; LDS gap dattri - ours {f(c['gap'])} "
        f"(sd of a difference of two means: {f(c['gap_sd'])})"
        for c in out["cross"]
    ]
    lines.append(
        f"\nEvaluation ground truth of compare.py (50 subsets, target -loss), dattri's defaults on both sides "
        f"({out['hparams']}); one CPU thread per job, shared 2-core host (contended). Seeds {out['seeds']}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dattri-job", default=None, help="run one dattri job (inside dattri's venv)")
    p.add_argument("--model", default="lr", choices=list(common.MODELS))
    p.add_argument("--methods", nargs="+", default=["factgrass"], choices=["factgrass", "logra"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--sides", nargs="+", default=["ours", "dattri"], choices=["ours", "dattri"])
    p.add_argument("--dattri-python", default="/work/peers/dattri/bin/python")
    p.add_argument("--timeout", type=float, default=1200)
    common.add_device_arg(p)
    args = p.parse_args(argv)
    if args.dattri_job:
        return _dattri_job_main(args.dattri_job)
    common.one_thread()
    gt = common.load_ground_truth(common.prepare_ground_truth(args.model))
    jobs = common.new_jobs_dir("factgrass_seeds")
    rows, cross = [], []
    for method in args.methods:
        got: dict[str, dict[int, torch.Tensor]] = {}
        for side in args.sides:
            scores, times = {}, []
            for seed in args.seeds:
                if side == "ours":
                    sc, t = run_ours(method, args.model, seed, common.resolve_device(args.device))
                else:
                    res = _dattri_side(args, method, seed, jobs)
                    if not res.get("ok"):
                        print(
                            f"[seeds] dattri seed {seed}: {res.get('error', '')[:400]}",
                            file=sys.stderr,
                        )
                        continue
                    sc, t = (
                        common.read_safetensors(res["scores_path"])[0]["scores"],
                        res["time_total"],
                    )
                scores[seed] = sc
                times.append(t)
                print(f"[seeds] {method} {side} seed {seed}: {t:.1f}s", file=sys.stderr, flush=True)
            got[side] = scores
            rows.append(
                {
                    "model": args.model,
                    "method": method,
                    "side": side,
                    **_summary(scores, gt),
                    "time_mean": statistics.fmean(times) if times else None,
                }
            )
        if len(got) == 2:
            both = sorted(set(got["ours"]) & set(got["dattri"]))
            o, d = rows[-2], rows[-1]
            gap = (
                None
                if o["lds_mean"] is None or d["lds_mean"] is None
                else d["lds_mean"] - o["lds_mean"]
            )
            sds = [x["lds_sd"] for x in (o, d)]
            gap_sd = (
                None
                if None in sds
                else (sds[0] ** 2 / len(o["lds"]) + sds[1] ** 2 / len(d["lds"])) ** 0.5
            )
            cross.append(
                {
                    "model": args.model,
                    "method": method,
                    "gap": gap,
                    "gap_sd": gap_sd,
                    "cross_agreement": statistics.fmean(
                        common.column_agreement(got["ours"][s], got["dattri"][s]) for s in both
                    )
                    if both
                    else None,
                }
            )
    out = {
        "rows": rows,
        "cross": cross,
        "seeds": args.seeds,
        "hparams": {m: common.METHODS[m]["hparams"] for m in args.methods},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    stem = common.RESULTS_DIR / "factgrass_seeds"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str))
    stem.with_suffix(".md").write_text(render(out) + "\n")
    print(render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
