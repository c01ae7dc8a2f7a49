"""Time every tdabench attributor on MNIST (4,500 train x 500 test) LR and MLP (issue 2's table).

    .venv/bin/python benchmarks/attribution_timing.py [--quick] [--models lr mlp] [--methods ...]

Each (method, model) runs in a fresh process with one CPU thread; the table shows the median
over ``--repeats`` runs of the wall time of ``cache`` + ``attribute`` (setup -- imports, data,
task -- excluded), the process's peak RSS, and the LDS against the shared ground truth
(benchmarks/common.py; LR ground truth by default, MLP with ``--mlp-gt``). Hyper-parameters are
the table ``benchmarks.common.METHODS`` that compare.py uses too. Results go to
``benchmarks/results/attribution_timing.{json,md}``.

The same file is the job runner for our side of compare.py: ``attribution_timing.py --job JOB.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

# the classes of tdabench.algorithm each method kind needs
OUR_CLASSES = {
    "if_explicit": "IFAttributorExplicit",
    "if_cg": "IFAttributorCG",
    "if_lissa": "IFAttributorLiSSA",
    "if_arnoldi": "IFAttributorArnoldi",
    "tracin": "TracInAttributor",
    "grad_dot": "TracInAttributor",
    "grad_cos": "TracInAttributor",
    "rps": "RPSAttributor",
    "trak": "TRAKAttributor",
    "datainf": "IFAttributorDataInf",
    "logra": "LoGraAttributor",
    "factgrass": "FactGraSSAttributor",
    "ekfac": "IFAttributorEKFAC",
}


def available_methods() -> tuple[list[str], list[str]]:
    """(methods whose tdabench class imports, missing class names) -- checked in a subprocess-free way."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    src = str(common.ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    try:
        import tdabench.algorithm as alg
    except Exception as exc:  # pragma: no cover - broken install
        return [], [f"tdabench.algorithm ({type(exc).__name__}: {exc})"]
    have, missing = [], set()
    for method, spec in common.METHODS.items():
        name = OUR_CLASSES[spec["kind"]]
        if hasattr(alg, name):
            have.append(method)
        else:
            missing.add(name)
    return have, sorted(missing)


# --------------------------------------------------------------------------- job runner (ours)
def projector_kwargs(p: dict[str, Any]) -> dict[str, Any]:
    """The METHODS projector settings (dattri's key names) in tdabench's keys.

    tdabench accepts ``proj_dim``, ``proj_type``, ``seed``, ``max_chunk_bytes``; dattri's
    ``proj_seed`` is ``seed`` here, and ``proj_max_batch_size`` / ``device`` have no
    equivalent (chunking is by memory budget; the attributor's device is used).
    """
    out = {k: v for k, v in p.items() if k in ("proj_dim", "proj_type", "seed", "max_chunk_bytes")}
    if "proj_seed" in p:
        out["seed"] = p["proj_seed"]
    return out


ON_START: list[Any] = []  # called right before the timed region (second_run_peak_mb uses it)


def build_and_run(job: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    import tdabench.algorithm as alg
    from tdabench.task import AttributionTask

    model_name, kind, hp = job["model"], job["kind"], dict(job["hparams"])
    dev = job.get("device", "cpu")  # gpu_compare.py / --device; the attributor moves model and data
    cls = getattr(alg, OUR_CLASSES[kind])
    model = common.build_model(model_name)
    model.eval()
    ckpts = common.load_checkpoints(job)
    data = common.load_data(Path(job["cache_dir"]))
    dl = common.loaders(data, job["batches"], job.get("n_test"))
    layer = common.layer_names(model_name, job["layer"])
    loss = common.make_loss_func(model)
    ckpt_arg = ckpts[0] if len(ckpts) == 1 else ckpts
    setup: dict[str, float] = {}

    def start() -> float:
        common.warm_torch()
        setup["setup_rss_mb"] = common.peak_rss_mb()[1]
        for hook in ON_START:
            hook()
        return time.perf_counter()

    if kind in (
        "datainf",
        "logra",
        "factgrass",
    ):  # cache + attribute(train, test); LoGra/FactGraSS: layer_names
        where = {"layer_name": layer} if kind == "datainf" else {"layer_names": layer}
        att = cls(
            AttributionTask(loss_func=loss, model=model, checkpoints=ckpt_arg),
            device=dev,
            **where,
            **hp,
        )
        t0 = start()
        att.cache(dl["cache"])
        t1 = time.perf_counter()
        scores = att.attribute(dl["train"], dl["test"])
    elif kind.startswith("if_"):
        att = cls(
            AttributionTask(loss_func=loss, model=model, checkpoints=ckpt_arg),
            layer_name=layer,
            device=dev,
            **hp,
        )
        t0 = start()
        att.cache(dl["cache"])
        t1 = time.perf_counter()
        scores = att.attribute(dl["train"], dl["test"])
    elif kind in ("tracin", "grad_dot", "grad_cos"):
        task = AttributionTask(loss_func=loss, model=model, checkpoints=ckpt_arg)
        att = cls(
            task,
            weight_list=torch.tensor(job["checkpoint_weights"], dtype=torch.float32),
            normalized_grad=hp["normalized_grad"],
            projector_kwargs=projector_kwargs(hp["projector_kwargs"]),
            layer_name=layer,
            device=dev,
        )
        t0 = start()
        if getattr(att, "requires_cache", False):
            att.cache(dl["train"])
        t1 = time.perf_counter()
        scores = att.attribute(dl["train"], dl["test"])
    elif kind == "trak":
        task = AttributionTask(
            loss_func=common.make_margin_func(model), model=model, checkpoints=ckpt_arg
        )
        att = cls(
            task,
            correct_probability_func=common.make_prob_func(model),
            projector_kwargs=projector_kwargs(hp["projector_kwargs"]),
            layer_name=layer,
            device=dev,
            regularization=hp["regularization"],
        )
        t0 = start()
        att.cache(dl["cache"])
        t1 = time.perf_counter()
        scores = att.attribute(dl["train"], dl["test"])  # tdabench: train first, for every method
    elif kind == "rps":
        task = AttributionTask(
            loss_func=loss, model=model, checkpoints=ckpt_arg, target_func=common.rps_target_func
        )
        # Our refit against the labels (the method the README's RPS rows measure); "auto" would
        # pick dattri's refit on predicted probabilities, since this target takes (outputs, targets).
        att = cls(
            task,
            final_linear_layer_name=common.FINAL_LAYER[model_name],
            device=dev,
            refit_loss="labels",
            **hp,
        )
        t0 = start()
        att.cache(dl["cache"])
        t1 = time.perf_counter()
        scores = att.attribute(dl["train"], dl["test"])
    elif kind == "ekfac":  # every Linear layer (module_name=None), as dattri's default
        att = cls(
            AttributionTask(loss_func=loss, model=model, checkpoints=ckpt_arg), device="cpu", **hp
        )
        t0 = start()
        att.cache(dl["cache"])
        t1 = time.perf_counter()
        scores = att.attribute(dl["train"], dl["test"])
    else:
        raise ValueError(f"unknown method kind {kind!r}")
    common.sync_device(dev)
    t2 = time.perf_counter()
    return scores, {
        "time_cache": t1 - t0,
        "time_attribute": t2 - t1,
        "time_total": t2 - t0,
        **setup,
    }


def second_run_peak_mb(job: dict[str, Any]) -> float:
    """Peak RSS growth of a *second* cache + attribute in this process, MiB (memory_bound.py).

    The first run pays the one-time costs (lazily loaded code, allocator arenas); in the second,
    right before ``cache`` (data, checkpoints and loaders already built) freed memory is handed
    back to the OS (``malloc_trim``) and the high-water mark is reset (``/proc/self/clear_refs``):
    the growth above that point is the working memory of the method, including the score matrix
    it returns. Linux only.
    """
    import ctypes
    import gc

    build_and_run(job)
    base: list[float] = []

    def mark() -> None:  # data, checkpoints, model and loaders exist now; the method starts
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base.append(common.peak_rss_mb()[1])

    ON_START.append(mark)
    try:
        build_and_run(job)
    finally:
        ON_START.remove(mark)
    return common.peak_rss_mb()[0] - base[0]


def run_job_file(path: str) -> int:
    job = json.loads(Path(path).read_text())
    common.one_thread()
    result: dict[str, Any] = {
        "side": "ours",
        "method": job["method"],
        "model": job["model"],
        "ok": False,
    }
    try:
        import tdabench

        result["version"] = getattr(tdabench, "__version__", "?")
        result["torch"] = torch.__version__
        if job.get("memory_only"):
            result["work_mb"] = second_run_peak_mb(job)
            result["ok"] = True
            common.finish_job(job, result, None)
            return 0
        scores, times = build_and_run(job)
        result.update(times)
        result["ok"] = True
        common.finish_job(job, result, scores)
        return 0
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
        common.finish_job(job, result, None)
        return 1


OURS_CMD = [sys.executable, str(Path(__file__).resolve()), "--job"]


# --------------------------------------------------------------------------- table
def fmt(x: Any, spec: str = ".2f") -> str:
    if x is None:
        return "-"
    try:
        if x != x:  # NaN
            return "NaN"
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def ground_truths(args: argparse.Namespace, models: list[str]) -> dict[str, Path | None]:
    out: dict[str, Path | None] = {}
    for m in models:
        given = getattr(args, f"gt_{m}", None)
        if given:
            out[m] = Path(given)
        elif m == "lr" or args.mlp_gt:
            out[m] = common.prepare_ground_truth(m, num_subsets=args.gt_subsets)
        else:
            out[m] = None
    return out


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick", action="store_true", help="one repetition per measurement (default 3)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="repetitions per measurement (median is reported)"
    )
    p.add_argument("--models", nargs="+", default=list(common.MODELS), choices=list(common.MODELS))
    p.add_argument(
        "--methods", nargs="+", default=list(common.METHODS), choices=list(common.METHODS)
    )
    p.add_argument(
        "--n-test", type=int, default=None, help="use only the first N test digits (smoke runs)"
    )
    p.add_argument(
        "--gt-lr",
        default=None,
        help="LDS ground truth file for LR (default: build/reuse the cached one)",
    )
    p.add_argument("--gt-mlp", default=None, help="LDS ground truth file for the MLP")
    p.add_argument(
        "--mlp-gt",
        action="store_true",
        help="build the MLP LDS ground truth too (~10 min on one core)",
    )
    p.add_argument(
        "--gt-subsets",
        type=int,
        default=None,
        help=f"subsets of the built ground truth (default {common.GT_SPEC['num_subsets']})",
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per job before it is killed"
    )
    p.add_argument(
        "--mem-limit-gb",
        type=float,
        default=12.0,
        help="address-space cap per job (RLIMIT_AS); 0 = none",
    )
    common.add_device_arg(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    add_common_args(p)
    args = p.parse_args(argv)
    if args.job:
        return run_job_file(args.job)
    have, missing = available_methods()
    methods = [m for m in args.methods if m in have]
    if not methods:
        print(
            "attribution_timing: tdabench.algorithm does not provide the attributors yet "
            f"(missing: {', '.join(missing)}). Merge the attributor branches and rerun.",
            file=sys.stderr,
        )
        return 2
    skipped = [m for m in args.methods if m not in have]
    repeats = args.repeats or (1 if args.quick else 3)
    device = common.resolve_device(args.device)
    paths = {m: common.prepare_checkpoints(m) for m in args.models}
    gts = ground_truths(args, args.models)
    jobs_dir = common.new_jobs_dir("attribution_timing")
    rows = []
    for model_name in args.models:
        gt = common.load_ground_truth(gts[model_name]) if gts[model_name] else None
        for method in methods:
            runs = []
            for rep in range(repeats):
                job = common.make_job(
                    "ours",
                    method,
                    model_name,
                    paths[model_name],
                    jobs_dir,
                    args.n_test,
                    rep,
                    device=device,
                )
                runs.append(common.run_job(OURS_CMD, job, args.timeout, args.mem_limit_gb))
            s = common.summarize(runs)
            if s["ok"] and gt is not None and not args.n_test:
                s["lds"], s["lds_impl"] = common.lds(
                    common.read_safetensors(s["scores_path"])[0]["scores"], *gt
                )
            rows.append({"model": model_name, "method": method, **s})
            print(
                f"{model_name:4s} {method:12s} ok={s['ok']} total={fmt(s.get('time_total'))}s "
                f"rss={fmt(s.get('ru_maxrss_mb'), '.0f')}MB lds={fmt(s.get('lds'), '.3f')} {s.get('error', '')}",
                file=sys.stderr,
                flush=True,
            )
    lines = [
        "| model | method | cache (s) | attribute (s) | total (s) | peak RSS (MB) | LDS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["ok"]:
            lines.append(
                f"| {r['model']} | {r['method']} | {fmt(r.get('time_cache'))} | {fmt(r.get('time_attribute'))} | "
                f"{fmt(r.get('time_total'))} | {fmt(r.get('ru_maxrss_mb'), '.0f')} | {fmt(r.get('lds'), '.3f')} |"
            )
        else:
            lines.append(
                f"| {r['model']} | {r['method']} | failed: {r.get('error', '')[:120]} | | | | |"
            )
    where = "one CPU thread" if device == "cpu" else f"device {device}"
    note = (
        f"\n4,500 train x {args.n_test or common.N_TEST} test MNIST digits, {where}, median of {repeats} run(s); "
        f"peak RSS = whole process (python + torch ≈ setup); hyper-parameters: benchmarks/common.py METHODS."
    )
    if skipped:
        note += f"\nNot run (class missing in tdabench.algorithm): {', '.join(skipped)}."
    table = "\n".join(lines) + "\n" + note
    print(table)
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem_suffix = ("_smoke" if args.n_test else "") + (
        "" if device == "cpu" else "_" + device.replace(":", "")
    )
    (common.RESULTS_DIR / f"attribution_timing{stem_suffix}.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "repeats": repeats,
                "methods": {m: common.METHODS[m] for m in methods},
                "torch": torch.__version__,
            },
            indent=1,
        )
    )
    (common.RESULTS_DIR / f"attribution_timing{stem_suffix}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
