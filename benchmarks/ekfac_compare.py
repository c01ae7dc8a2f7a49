"""EK-FAC / K-FAC on the harness's MNIST MLP: tdabench vs kronfluence 1.0.1 vs dattri 0.3.0.

    .venv/bin/python benchmarks/ekfac_compare.py [--repeats N] [--sides ours kronfluence dattri]
        [--kron-python /work/peers/kron/bin/python] [--dattri-python /work/peers/dattri/bin/python]

1. Shared inputs from benchmarks/common.py (cached): the 4,500 / 500 MNIST split, the MLP
   checkpoint, and the 50-subset LDS ground truth used for evaluation (target -loss).
2. **Held-out ground truth** for choosing the damping: ``--heldout-subsets`` (50) further half-data
   MLP retrainings with other subset and model seeds (7000+s, 8000+s), disjoint from the evaluation
   subsets (seeds 2000+s), written under benchmarks/results/jobs/ (gitignored) and reused.
3. **Tuning** (ours, one process, not timed; ``--tuning FILE`` reuses rows of an earlier run with
   the same held-out ground truth): for each strategy and Fisher kind, factors fitted once; the
   LDS needs only subset sums, so the training side is reduced to ``mask @ G̃`` and every damping
   of the grid (``1e-8`` absolute, ``FACTORS`` x each layer's mean eigenvalue, and per-layer
   factors by coordinate ascent from the best uniform one) costs one small product, on all
   ``--tune-test`` test digits (default all 500). The damping with the best held-out LDS is
   kept. The evaluation ground truth is never read here.
4. **Timed rows**, each job in a fresh one-thread process (``--repeats``, median): ours with the
   chosen damping, ours and kronfluence with 1e-8 and with the 0.1 x mean heuristic (EK-FAC and
   K-FAC), dattri's ``IFAttributorEKFAC`` with damping 1e-8 (it has no relative damping). Time =
   factor fit + scores; LDS on the evaluation ground truth.
5. ``benchmarks/results/ekfac_compare.{json,md}``.

``--job JOB.json`` runs one of our jobs (used by step 4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

KRON_RUNNER = common.BENCH_DIR / "peers" / "kronfluence_attribute.py"
DATTRI_RUNNER = common.BENCH_DIR / "peers" / "dattri_attribute.py"
HELDOUT = {"seed": 7000, "model_seed_offset": 8000, "subset_ratio": 0.5}
BATCHES = {"cache": 500, "train": 500, "test": 500}
# dattri recomputes the test side for every train batch: one train batch is its best case
DATTRI_BATCHES = {"cache": 500, "train": common.N_TRAIN, "test": 500}
FACTORS = [0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0]


def log(msg: str) -> None:
    print(f"[ekfac] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- held-out ground truth
def heldout_ground_truth(num_subsets: int) -> Path:
    """``num_subsets`` more half-data MLP retrainings, seeds disjoint from the evaluation ground truth."""
    data = common.load_data()
    spec = {**HELDOUT, "num_subsets": int(num_subsets)}
    key = common._fingerprint({"model": "mlp", "data": common.data_sha256(), "heldout": spec})
    path = (
        common.RESULTS_DIR / "jobs" / "ekfac-heldout" / f"gt_mlp_heldout_{num_subsets}.safetensors"
    )
    if path.is_file() and common.read_safetensors(path)[1].get("key") == key:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    k = int(common.N_TRAIN * spec["subset_ratio"])
    idx = [
        torch.randperm(common.N_TRAIN, generator=torch.Generator().manual_seed(spec["seed"] + s))[
            :k
        ]
        .sort()
        .values
        for s in range(num_subsets)
    ]
    states, _ = common.train_many(
        "mlp",
        data["x_train"],
        data["y_train"],
        idx,
        [spec["model_seed_offset"] + s for s in range(num_subsets)],
    )
    evs = [common.evaluate("mlp", st, data["x_test"], data["y_test"]) for st in states]
    tensors = {
        "indices": torch.stack(idx),
        "neg_loss": torch.stack([e["neg_loss"] for e in evs]).float(),
        "margin": torch.stack([e["margin"] for e in evs]).float(),
    }
    common.write_safetensors(tensors, path, {"key": key, "spec": json.dumps(spec)})
    log(f"held-out ground truth ({num_subsets} subsets) in {time.perf_counter() - t0:.1f}s")
    return path


# --------------------------------------------------------------------------- our side
def _our_task(job: dict[str, Any]):
    from tdabench.task import AttributionTask

    model = common.build_model(job["model"])
    model.eval()
    ckpts = common.load_checkpoints(job)  # several: scores averaged over checkpoints
    return AttributionTask(
        common.make_loss_func(model), model, ckpts[0] if len(ckpts) == 1 else ckpts
    )


def run_our_job(job: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    from tdabench.algorithm import IFAttributorEKFAC

    hp = dict(job["hparams"])
    data = common.load_data(Path(job["cache_dir"]))
    dl = common.loaders(data, job["batches"], job.get("n_test"))
    att = IFAttributorEKFAC(
        _our_task(job),
        damping=hp["damping"],
        damping_factor=hp.get("damping_factor"),
        strategy=hp["strategy"],
        fisher=hp["fisher"],
        device=job.get("device", "cpu"),
    )
    common.warm_torch()
    setup = common.peak_rss_mb()[1]
    t0 = time.perf_counter()
    att.cache(dl["cache"])
    t1 = time.perf_counter()
    scores = att.attribute(dl["train"], dl["test"])
    t2 = time.perf_counter()
    return scores, {
        "time_cache": t1 - t0,
        "time_attribute": t2 - t1,
        "time_total": t2 - t0,
        "setup_rss_mb": setup,
    }


def _layer_sums(
    att: Any, loader: Any, which: str, masks: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Per layer, rotated per-sample gradients ``(n, d_out, d_in')`` (``masks`` None), or their
    sums over each subset ``(S, d_out, d_in')`` (``masks`` ``(S, n)``), float64."""
    from tdabench.func.capture import capture_task

    op, out, start = att.operators[0], {}, 0
    for batch in att._batches(loader, which):
        io = capture_task(att.task, batch, att.modules, which, 0, att.device)
        for lf in op.layers:
            rec = io[lf.name]
            g, a = (rec.g @ lf.q_s).double(), (rec.a @ lf.q_a).double()
            if masks is None:
                part = torch.einsum("bto,bti->boi", g, a)
            else:
                m = masks[:, start : start + g.shape[0]]
                part = torch.einsum("sb,bto,bti->soi", m, g, a)
            out[lf.name] = (
                part
                if lf.name not in out
                else (out[lf.name] + part if masks is not None else torch.cat([out[lf.name], part]))
            )
        start += batch[0].shape[0]
    return out


def _lds_of(pred: torch.Tensor, values: torch.Tensor) -> float:
    """Mean Spearman over test columns of subset predictions ``(S, n_test)`` vs ``values``."""
    from scipy.stats import rankdata

    rp, rv = rankdata(pred.numpy(), axis=0), rankdata(values.double().numpy(), axis=0)
    rp, rv = rp - rp.mean(0), rv - rv.mean(0)
    corr = (rp * rv).sum(0) / ((rp**2).sum(0) * (rv**2).sum(0)) ** 0.5
    return float(corr[~torch.isnan(torch.as_tensor(corr))].mean())


def _grid(
    layers: list[Any],
    test: dict[str, torch.Tensor],
    train: dict[str, torch.Tensor],
    values: torch.Tensor,
    rounds: int,
) -> list[tuple[float, Any, float]]:
    """``(damping, damping_factor, held-out LDS)``: 1e-8, every uniform factor, per-layer factors."""

    def pred(lf: Any, damping: float) -> torch.Tensor:  # (S, n_test)
        x = test[lf.name] / (lf.eigenvalues().double() + damping)
        return train[lf.name].flatten(1) @ x.flatten(1).T

    cache = {(lf.name, f): pred(lf, lf.damping(0.0, f)) for lf in layers for f in FACTORS}

    def lds_of(factors: dict[str, float]) -> float:
        return _lds_of(sum(cache[(lf.name, factors[lf.name])] for lf in layers), values)

    out = [(1e-8, None, _lds_of(sum(pred(lf, 1e-8) for lf in layers), values))]
    uniform = {f: lds_of({lf.name: f for lf in layers}) for f in FACTORS}
    out += [(0.0, f, v) for f, v in uniform.items()]
    best = {lf.name: max(uniform, key=uniform.get) for lf in layers}
    for _ in range(rounds):
        for lf in layers:
            best[lf.name] = max(FACTORS, key=lambda f, n=lf.name: lds_of({**best, n: f}))
    return [*out, (0.0, dict(best), lds_of(best))]


def tune(
    paths: dict[str, Any],
    gt_path: Path,
    n_test: int | None,
    device: str,
    fishers: tuple[str, ...] = ("empirical", "true", "ggn"),
    strategies: tuple[str, ...] = ("ekfac", "kfac"),
    rounds: int = 2,
) -> list[dict[str, Any]]:
    """Held-out LDS of every (strategy, fisher, damping) of the grid, plus per-layer factors.

    Only subset sums enter the LDS, so the training side is reduced once to ``mask @ G̃``
    (subsets x rotated gradient) and each damping costs one ``(S, D) x (D, n_test)`` product.
    Per-layer factors: coordinate ascent over the layers from the best uniform factor
    (``rounds`` sweeps of ``FACTORS`` per layer), on the same held-out ground truth.
    """
    from tdabench.algorithm import IFAttributorEKFAC

    data = common.load_data()
    dl = common.loaders(data, BATCHES, n_test)
    values, indices = common.load_ground_truth(gt_path)
    values = values[:, : (n_test or values.shape[1])]
    masks = torch.zeros(indices.shape[0], common.N_TRAIN, dtype=torch.float64)
    masks.scatter_(1, indices.long(), 1.0)
    rows = []
    for strategy in strategies:
        for fisher in fishers:
            t0 = time.perf_counter()
            att = IFAttributorEKFAC(
                _our_task({"model": "mlp", "checkpoint_paths": [paths["final"]]}),
                strategy=strategy,
                fisher=fisher,
                device=device,
            )
            att.cache(dl["cache"])
            found = _grid(
                att.operators[0].layers,
                _layer_sums(att, dl["test"], "target", None),
                _layer_sums(att, dl["train"], "loss", masks),
                values,
                rounds,
            )
            rows += [
                {
                    "strategy": strategy,
                    "fisher": fisher,
                    "damping": d,
                    "damping_factor": f,
                    "heldout_lds": v,
                }
                for d, f, v in found
            ]
            for r in rows[-len(FACTORS) - 2 :]:
                log(
                    f"tune {strategy} {fisher} damping={r['damping']} factor={r['damping_factor']}: held-out LDS {r['heldout_lds']:.4f}"
                )
            log(f"tune {strategy} {fisher}: {time.perf_counter() - t0:.1f}s")
    return rows


# --------------------------------------------------------------------------- orchestration
def _job(
    side: str,
    name: str,
    hp: dict[str, Any],
    paths: dict[str, Any],
    jobs_dir: Path,
    rep: int,
    kind: str,
) -> dict[str, Any]:
    stem = f"{side}_mlp_{name}_r{rep}"
    return {
        "side": side,
        "method": name,
        "model": "mlp",
        "kind": kind,
        "hparams": hp,
        "layer": None,
        "batches": DATTRI_BATCHES if side == "dattri" else BATCHES,
        "checkpoint_paths": paths["halves"]
        if hp.get("checkpoints") == "halves"
        else [paths["final"]],
        "checkpoint_weights": [1.0],
        "cache_dir": str(common.CACHE_DIR),
        "n_test": None,
        "device": "cpu",
        "scores_path": str(jobs_dir / f"{stem}.scores.safetensors"),
        "result_path": str(jobs_dir / f"{stem}.result.json"),
        "job_path": str(jobs_dir / f"{stem}.job.json"),
        "log_path": str(jobs_dir / f"{stem}.log"),
    }


def plan(
    best: dict[str, dict[str, Any]], sides: list[str], fishers: list[str]
) -> list[tuple[str, str, dict[str, Any], str]]:
    """``(side, row name, hparams, kind)`` of every timed row."""
    out = []
    for strategy in ("ekfac", "kfac"):
        b = best.get(strategy)
        if b is not None and "ours" in sides:
            out.append(
                (
                    "ours",
                    f"{strategy}_tuned",
                    {
                        "strategy": strategy,
                        "fisher": b["fisher"],
                        "damping": b["damping"],
                        "damping_factor": b["damping_factor"],
                    },
                    "ekfac",
                )
            )
            # the same damping on TRAK-10's ten half-data models (scores averaged): the stretch row
            tuned = out[-1][2]
            out.append(
                ("ours", f"{strategy}_tuned_halves10", {**tuned, "checkpoints": "halves"}, "ekfac")
            )
        u = best.get(f"{strategy}_uniform")  # one factor for every layer (the configs' default)
        if u is not None and "ours" in sides:
            hp = {k: u[k] for k in ("fisher", "damping", "damping_factor")}
            out.append(("ours", f"{strategy}_tuned_uniform", {"strategy": strategy, **hp}, "ekfac"))
        for label, d, f in (("1e-8", 1e-8, None), ("heuristic", 0.0, 0.1)):
            for fisher in fishers:
                if "ours" in sides:
                    out.append(
                        (
                            "ours",
                            f"{strategy}_{fisher}_{label}",
                            {
                                "strategy": strategy,
                                "fisher": fisher,
                                "damping": d,
                                "damping_factor": f,
                            },
                            "ekfac",
                        )
                    )
            if "kronfluence" in sides:
                out.append(
                    (
                        "kronfluence",
                        f"{strategy}_true_{label}",
                        {
                            "strategy": strategy,
                            "use_empirical_fisher": False,
                            "damping_factor": None if f else d,
                        },
                        "kron",
                    )
                )
    if "dattri" in sides:
        out.append(("dattri", "ekfac_empirical_1e-8", {"damping": 1e-8}, "ekfac"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--job", default=None, help="run one of our jobs (internal)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--sides",
        nargs="+",
        default=["ours", "kronfluence", "dattri"],
        choices=["ours", "kronfluence", "dattri"],
    )
    p.add_argument("--kron-python", default="/work/peers/kron/bin/python")
    p.add_argument("--dattri-python", default="/work/peers/dattri/bin/python")
    p.add_argument("--heldout-subsets", type=int, default=50)
    p.add_argument(
        "--tune-test",
        type=int,
        default=None,
        help="test digits used for tuning on the held-out ground truth (default: all)",
    )
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--only", nargs="*", default=None, help="run only these row names")
    p.add_argument(
        "--fishers",
        nargs="+",
        default=["empirical", "true", "ggn"],
        help="Fisher kinds tuned and timed",
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="merge the rows run now into the existing ekfac_compare.json",
    )
    p.add_argument("--strategies", nargs="+", default=["ekfac", "kfac"], help="strategies tuned")
    p.add_argument(
        "--tune-only", action="store_true", help="print the held-out tuning table and stop"
    )
    p.add_argument(
        "--tuning",
        nargs="*",
        default=[],
        help="JSON files of earlier tuning rows (same held-out ground truth); "
        "Fisher kinds they cover are not tuned again",
    )
    p.add_argument(
        "--row-fishers",
        nargs="+",
        default=["true"],
        help="Fisher kinds of our 1e-8 / heuristic rows (kronfluence's default is 'true')",
    )
    args = p.parse_args(argv)
    if args.job:
        return _run_job_file(args.job)
    common.one_thread()
    t_start = time.perf_counter()
    paths = common.prepare_checkpoints("mlp")
    gt_eval = common.prepare_ground_truth("mlp")
    gt_held = heldout_ground_truth(args.heldout_subsets)
    tuning = [r for f in args.tuning for r in json.loads(Path(f).read_text())]
    todo = tuple(f for f in args.fishers if not any(r["fisher"] == f for r in tuning))
    tuning += (
        tune(paths, gt_held, args.tune_test, args.device, todo, tuple(args.strategies))
        if todo
        else []
    )
    if args.tune_only:
        (common.RESULTS_DIR / "jobs").mkdir(parents=True, exist_ok=True)
        (common.RESULTS_DIR / "jobs" / f"ekfac_tuning_{'_'.join(todo)}.json").write_text(
            json.dumps(tuning, indent=1)
        )
        print(json.dumps(tuning, indent=1))
        return 0
    best = {}
    for strategy in ("ekfac", "kfac"):
        rows = [r for r in tuning if r["strategy"] == strategy]
        best[strategy] = max(rows, key=lambda r: r["heldout_lds"])
        uniform = [r for r in rows if not isinstance(r["damping_factor"], dict)]
        if uniform and uniform != rows:
            best[f"{strategy}_uniform"] = max(uniform, key=lambda r: r["heldout_lds"])
    log(f"chosen on held-out ground truth: {best}")
    gt = common.load_ground_truth(gt_eval)
    jobs_dir = common.new_jobs_dir("ekfac")
    cmds = {
        "ours": [sys.executable, str(Path(__file__).resolve()), "--job"],
        "kronfluence": [args.kron_python, str(KRON_RUNNER)],
        "dattri": [args.dattri_python, str(DATTRI_RUNNER)],
    }
    results = []
    for side, name, hp, kind in plan(best, args.sides, args.row_fishers):
        if args.only and name not in args.only:
            continue
        runs = [
            common.run_job(cmds[side], _job(side, name, hp, paths, jobs_dir, r, kind), args.timeout)
            for r in range(args.repeats)
        ]
        s = common.summarize(runs)
        if s["ok"]:
            s["lds"] = common.lds(common.read_safetensors(s["scores_path"])[0]["scores"], *gt)[0]
        results.append({"side": side, "name": name, "hparams": hp, **s})
        log(
            f"{side} {name}: ok={s['ok']} t={s.get('time_total')} lds={s.get('lds')} {s.get('error', '')[:300]}"
        )
    prev = common.RESULTS_DIR / "ekfac_compare.json"
    if args.update and prev.is_file():  # keep the earlier rows that were not rerun now
        fresh = {(r["side"], r["name"]) for r in results}
        results = [
            r for r in json.loads(prev.read_text())["rows"] if (r["side"], r["name"]) not in fresh
        ] + results
    out = {
        "tuning": tuning,
        "chosen": best,
        "rows": results,
        "repeats": args.repeats,
        "batches": BATCHES,
        "heldout": {**HELDOUT, "num_subsets": args.heldout_subsets, "tune_test": args.tune_test},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load": os.getloadavg(),
        },
        "seconds": time.perf_counter() - t_start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (common.RESULTS_DIR / "ekfac_compare.json").write_text(json.dumps(out, indent=1))
    (common.RESULTS_DIR / "ekfac_compare.md").write_text(render(out) + "\n")
    print(render(out))
    return 0


def _run_job_file(path: str) -> int:
    import traceback

    job = json.loads(Path(path).read_text())
    common.one_thread()
    result: dict[str, Any] = {
        "side": "ours",
        "method": job["method"],
        "model": job["model"],
        "ok": False,
    }
    try:
        scores, times = run_our_job(job)
        result.update(times, ok=True)
        common.finish_job(job, result, scores)
        return 0
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
        common.finish_job(job, result, None)
        return 1


def _factor_text(f: Any) -> str:
    return (
        "{" + ", ".join(f"{k}: {v:g}" for k, v in f.items()) + "}"
        if isinstance(f, dict)
        else f"{f:g}"
    )


def render(out: dict[str, Any]) -> str:
    f = lambda v, s=".2f": "-" if v is None else format(v, s)  # noqa: E731
    lines = [
        "| side | row | strategy | Fisher | damping | time fit (s) | time scores (s) | total (s) | LDS |",
        "|" + "---|" * 9,
    ]
    for r in out["rows"]:
        hp = r["hparams"]
        fisher = hp.get("fisher") or ("empirical" if r["side"] == "dattri" else "true")
        if r["side"] == "kronfluence":
            damp = "0.1 x mean" if hp.get("damping_factor") is None else f"{hp['damping_factor']:g}"
        elif isinstance(hp.get("damping_factor"), dict):
            damp = (
                "(" + ", ".join(f"{v:g}" for v in hp["damping_factor"].values()) + ") x layer mean"
            )
        elif hp.get("damping_factor") is not None:
            damp = f"{hp['damping_factor']:g} x mean" + (
                f" + {hp['damping']:g}" if hp.get("damping") else ""
            )
        else:
            damp = f"{hp['damping']:g}"
        lines.append(
            f"| {r['side']} | {r['name']} | {hp.get('strategy', 'ekfac')} | {fisher} | {damp} | {f(r.get('time_cache'))} | "
            f"{f(r.get('time_attribute'))} | {f(r.get('time_total'))} | {f(r.get('lds'), '.3f')} |"
        )
    txt = "\n".join(lines)
    best = out["chosen"]
    txt += (
        "\n\nMNIST MLP 784-128-64-10 (benchmarks/common.py), 4,500 train x 500 test, all three Linear layers; one CPU thread "
        f"per job; median of {out['repeats']} run(s); loaders of 500 (dattri: one train batch of 4,500, its best case); LDS = Spearman over the 50 evaluation subsets, target -loss. "
        f"Damping of the `*_tuned` rows chosen on {out['heldout']['num_subsets']} held-out subsets (seeds disjoint from the "
        f"evaluation subsets), {out['heldout']['tune_test'] or 'all 500'} test digits: "
        + "; ".join(
            f"{k}: {v['fisher']} Fisher, damping {v['damping']:g}"
            + (
                f" + {_factor_text(v['damping_factor'])} x mean"
                if v["damping_factor"] is not None
                else ""
            )
            + f" (held-out LDS {v['heldout_lds']:.3f})"
            for k, v in best.items()
        )
        + f". Host load average at the end: {', '.join(f'{x:.1f}' for x in out['machine']['load'])}."
    )
    return txt


if __name__ == "__main__":
    sys.exit(main())
