"""Side-by-side performance harness: tdabench vs dattri 0.3.0 on the same data, checkpoints, ground truth.

    .venv/bin/python benchmarks/compare.py [--quick]

1. Creates, if missing, the peer virtualenv ``.peer-venvs/dattri`` (``torch==2.13.0`` CPU build +
   ``dattri==0.3.0``); the peer is driven as a black box by benchmarks/peers/dattri_attribute.py.
2. Prepares (once, cached under benchmarks/results/cache/) the 5,000 real MNIST digits
   (4,500 train / 500 test), the trained LR and MLP checkpoints (final, 10 epoch checkpoints for
   TracInCP, 10 half-data models for TRAK-10) and the LDS ground truth (LR by default; MLP with
   ``--mlp-gt``), all with plain torch code in benchmarks/common.py.
3. For every method both sides have (benchmarks/common.py ``METHODS`` -- the one table of
   hyper-parameters and loader batch sizes both sides use), runs each side in a fresh process with
   one CPU thread, ``--repeats`` times (default 3, ``--quick`` 1; ours and theirs interleaved), and
   records the median wall time of cache + attribute, the peak RSS of the process (``wait4``
   ru_maxrss) and the LDS of the scores on the shared ground truth (same metric code for both).
4. Adds the ground-truth retraining throughput row from benchmarks/retrain_throughput.py when that
   script (or its JSON) exists.
5. Prints a Markdown table with ours/theirs ratios and writes benchmarks/results/compare.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attribution_timing as ours
import common

PEER_VENVS = common.ROOT / ".peer-venvs"
DATTRI_RUNNER = common.BENCH_DIR / "peers" / "dattri_attribute.py"
RETRAIN_SCRIPT = common.BENCH_DIR / "retrain_throughput.py"
RETRAIN_JSON = common.RESULTS_DIR / "retrain_throughput.json"
GOAL_TIME_RATIO = 0.5
GOAL_LDS_SLACK = 0.01
GOAL_MEM_RATIO = 2.0


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- peer venvs
def _python_ok(py: Path, check: str) -> bool:
    if not py.is_file():
        return False
    r = subprocess.run(
        [str(py), "-c", check],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return r.returncode == 0


def _pip(py: Path, *args: str) -> bool:
    log(f"pip install {' '.join(args)}")
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", *args], capture_output=True, text=True
    )
    if r.returncode != 0:
        log(f"  failed: {r.stderr.strip()[-400:]}")
    return r.returncode == 0


def ensure_dattri(explicit: str | None) -> Path | None:
    """Path of a python that imports dattri 0.3.0 (creating ``.peer-venvs/dattri`` if needed)."""
    check = "import dattri, torch"
    for cand in (explicit, os.environ.get("TDABENCH_DATTRI_PYTHON")):
        if cand:
            if _python_ok(Path(cand), "import dattri"):
                return Path(cand)
            log(f"{cand} cannot import dattri; ignoring it")
    venv = PEER_VENVS / "dattri"
    py = venv / "bin" / "python"
    if _python_ok(py, "import dattri"):
        return py
    base = getattr(sys, "_base_executable", None) or shutil.which("python3") or "python3"
    log(f"creating {venv} with {base} (torch 2.13.0 CPU + dattri 0.3.0; a few minutes, once)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    # The CPU build of torch: a local '+cpu' wheel / index if pip can see one, else the PyTorch
    # CPU index, else plain PyPI (which may be a CUDA build: it still runs on CPU, only bigger).
    ok = (
        _pip(py, "torch==2.13.0+cpu")
        or _pip(py, "--index-url", "https://download.pytorch.org/whl/cpu", "torch==2.13.0")
        or _pip(py, "torch==2.13.0")
    )
    if not ok or not _pip(py, "dattri==0.3.0", "torch==2.13.0"):
        log("could not install dattri 0.3.0; the peer columns will be empty")
        return None
    if not _python_ok(py, "import torch; assert torch.version.cuda is None"):
        log("note: the peer venv got a CUDA build of torch (runs on CPU all the same)")
    return py if _python_ok(py, check) else None


# --------------------------------------------------------------------------- retraining row
def retrain_row(quick: bool, timeout: float, rerun: bool = False) -> dict[str, Any] | None:
    """Ground-truth retraining throughput from benchmarks/retrain_throughput.py (not duplicated here)."""
    if RETRAIN_SCRIPT.is_file() and (rerun or not RETRAIN_JSON.is_file()):
        cmd = [sys.executable, str(RETRAIN_SCRIPT), *(["--quick"] if quick else [])]
        log(f"running {' '.join(cmd[1:])}")
        try:
            subprocess.run(
                cmd, cwd=str(common.ROOT), env=common.job_env("ours"), timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            log("retrain_throughput.py timed out")
    if RETRAIN_JSON.is_file():
        try:
            return json.loads(RETRAIN_JSON.read_text())
        except json.JSONDecodeError:
            return None
    return None


def _retrain_lines(data: Any) -> list[str]:
    """Render retrain_throughput.json: a table for its ``results`` layout, else a generic list."""
    res = data.get("results") if isinstance(data, dict) else None
    if isinstance(res, dict) and all(isinstance(v, dict) and "dattri" in v for v in res.values()):
        lines = [
            "| model | trainer | models/s (wall) | dattri models/s | ratio wall | ratio CPU |",
            "|---|---|---|---|---|---|",
        ]
        for model_name, r in res.items():
            d = r["dattri"]
            for trainer, t in r.items():
                if trainer == "dattri" or not (isinstance(t, dict) and "models_per_s_wall" in t):
                    continue
                lines.append(
                    f"| {model_name} | {trainer} | {ours.fmt(t['models_per_s_wall'], '.3g')} | "
                    f"{ours.fmt(d.get('models_per_s_wall'), '.3g')} | {ours.fmt(t.get('ratio_wall'), '.2f')} | "
                    f"{ours.fmt(t.get('ratio_cpu'), '.2f')} |"
                )
        return lines
    rows = data.get("rows", data) if isinstance(data, dict) else data
    if isinstance(rows, dict):
        rows = [
            {"setting": k, **v} if isinstance(v, dict) else {"setting": k, "value": v}
            for k, v in rows.items()
        ]
    out = []
    for r in rows if isinstance(rows, list) else []:
        if isinstance(r, dict):
            out.append(
                "- "
                + ", ".join(
                    f"{k}: {ours.fmt(v, '.3g') if isinstance(v, float) else v}"
                    for k, v in r.items()
                    if not isinstance(v, (list, dict))
                )
            )
    return out


# --------------------------------------------------------------------------- main
def ratio(a: Any, b: Any) -> float | None:
    try:
        return float(a) / float(b) if a is not None and b not in (None, 0) else None
    except (TypeError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ours.add_common_args(p)
    p.add_argument(
        "--dattri-python",
        default=None,
        help="python of an existing dattri 0.3.0 env (else .peer-venvs/dattri)",
    )
    p.add_argument("--sides", nargs="+", default=["ours", "dattri"], choices=["ours", "dattri"])
    p.add_argument(
        "--setup-only",
        action="store_true",
        help="create the peer venv and the cached data/checkpoints/ground truth, then stop",
    )
    p.add_argument("--no-retrain", action="store_true", help="skip the retraining-throughput rows")
    p.add_argument(
        "--update",
        action="store_true",
        help="merge the rows measured now into the existing compare.json (same model+method replaced; with --sides ours the previous dattri cells are kept)",
    )
    p.add_argument(
        "--rerun-retrain",
        action="store_true",
        help="rerun benchmarks/retrain_throughput.py even if its JSON exists",
    )
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    t_start = time.perf_counter()

    cmds: dict[str, list[str]] = {}
    notes: list[str] = []
    if "dattri" in args.sides:
        py = ensure_dattri(args.dattri_python)
        if py is None:
            notes.append("dattri: the peer virtualenv could not be created; its columns are empty.")
        else:
            cmds["dattri"] = [str(py), str(DATTRI_RUNNER)]
    methods = list(args.methods)
    if "ours" in args.sides:
        have, missing = ours.available_methods()
        if missing:
            notes.append(
                f"ours: tdabench.algorithm lacks {', '.join(missing)} (not merged yet); those cells are empty."
            )
        if have:
            cmds["ours"] = ours.OURS_CMD
        ours_methods = set(have)
    else:
        ours_methods = set()

    paths = {m: common.prepare_checkpoints(m) for m in args.models}
    gts = ours.ground_truths(args, args.models)
    if args.setup_only:
        log(f"setup done: peers {sorted(cmds)}; cache {common.CACHE_DIR}")
        return 0

    jobs_dir = common.new_jobs_dir("compare")
    device = common.resolve_device(
        args.device
    )  # both sides run there (gpu_compare.py is the GPU harness)
    rows: list[dict[str, Any]] = []
    # dattri's summary and scores per (model, method), for the tdabench-only variants whose
    # METHODS entry names a ``peer``: dattri is not rerun for them, its peer row is reused
    peer_runs: dict[tuple[str, str], tuple[dict[str, Any], Any]] = {}
    prev_path = common.RESULTS_DIR / "compare.json"
    prev_rows = json.loads(prev_path.read_text()).get("rows", []) if prev_path.is_file() else []
    for model_name in args.models:
        gt = common.load_ground_truth(gts[model_name]) if gts[model_name] else None
        for method in methods:
            peer = common.METHODS[method].get("peer")
            sides = [
                s
                for s in ("ours", "dattri")
                if s in cmds
                and (s != "ours" or method in ours_methods)
                and not (s == "dattri" and peer)
            ]
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
            for rep in range(repeats):
                for side in sides:  # interleaved so that machine noise hits both sides alike
                    job = common.make_job(
                        side,
                        method,
                        model_name,
                        paths[model_name],
                        jobs_dir,
                        args.n_test,
                        rep,
                        device=device,
                    )
                    runs[side].append(
                        common.run_job(cmds[side], job, args.timeout, args.mem_limit_gb)
                    )
            row: dict[str, Any] = {"model": model_name, "method": method}
            scores = {}
            for side in sides:
                s = common.summarize(runs[side])
                if s["ok"]:
                    scores[side] = common.read_safetensors(s["scores_path"])[0]["scores"]
                    if gt is not None and not args.n_test:
                        s["lds"], s["lds_impl"] = common.lds(scores[side], *gt)
                row[side] = s
                if side == "dattri":
                    peer_runs[(model_name, method)] = (s, scores.get(side))
            if peer and "dattri" in cmds:
                got = peer_runs.get((model_name, peer))
                if got is None:  # peer not run now: its dattri cells from the previous compare.json
                    old = next(
                        (
                            r.get("dattri")
                            for r in prev_rows
                            if (r["model"], r["method"]) == (model_name, peer)
                        ),
                        None,
                    )
                    got = (old, None) if old else None
                if got is not None:
                    row["dattri"] = {**got[0], "peer_method": peer}
                    if got[1] is not None:
                        scores["dattri"] = got[1]
            if len(scores) == 2:
                row["agreement"] = common.column_agreement(scores["ours"], scores["dattri"])
            o, t = row.get("ours", {}), row.get("dattri", {})
            row["time_ratio"] = ratio(o.get("time_total"), t.get("time_total"))
            row["mem_ratio"] = ratio(o.get("ru_maxrss_mb"), t.get("ru_maxrss_mb"))
            rows.append(row)
            log(
                f"{model_name} {method}: "
                + "; ".join(
                    f"{s} {'ok' if row[s]['ok'] else 'FAILED ' + row[s].get('error', '')[:200]} "
                    f"t={ours.fmt(row[s].get('time_total'))}s rss={ours.fmt(row[s].get('ru_maxrss_mb'), '.0f')}MB "
                    f"lds={ours.fmt(row[s].get('lds'), '.3f')}"
                    for s in sides
                )
            )

    if args.update and not args.n_test and prev_rows:
        if "dattri" not in cmds:  # ours re-measured alone: keep the previous dattri cells
            prev_by_key = {(r["model"], r["method"]): r for r in prev_rows}
            for row in rows:
                old = prev_by_key.get((row["model"], row["method"]), {}).get("dattri")
                if old and "dattri" not in row:
                    row["dattri"] = {**old, "from_previous_run": True}
                    o, t = row.get("ours", {}), row["dattri"]
                    row["time_ratio"] = ratio(o.get("time_total"), t.get("time_total"))
                    row["mem_ratio"] = ratio(o.get("ru_maxrss_mb"), t.get("ru_maxrss_mb"))
        fresh = {(r["model"], r["method"]) for r in rows}
        rows = [r for r in prev_rows if (r["model"], r["method"]) not in fresh] + rows
        order = {
            (m, k): i
            for i, (m, k) in enumerate((m, k) for m in common.MODELS for k in common.METHODS)
        }
        rows.sort(key=lambda r: order.get((r["model"], r["method"]), 1 << 30))
    # issue 6's memory goal: the working memory measured by memory_bound.py (a second run in the
    # process, so one-time growth of the first run is not counted), when that file has the row
    mem_path = common.RESULTS_DIR / "memory_bound.json"
    mem_rows = (
        {(r["model"], r["method"]): r for r in json.loads(mem_path.read_text())["rows"]}
        if mem_path.is_file()
        else {}
    )
    for row in rows:
        m = mem_rows.get((row["model"], row["method"]))
        row.pop("mem_work_mb", None)
        row.pop("mem_bound_mb", None)
        if m and m.get("work_mb") is not None and not args.n_test:
            row["mem_work_mb"], row["mem_bound_mb"] = m["work_mb"], m["bound_mb"]

    retrain = None if args.no_retrain else retrain_row(args.quick, args.timeout, args.rerun_retrain)
    table = render(rows, repeats, args, notes, retrain)
    print(table)
    out = {
        "rows": rows,
        "repeats": repeats,
        "methods": {m: common.METHODS[m] for m in methods},
        "recipes": common.RECIPES,
        "gt_spec": common.GT_SPEC,
        "ground_truth": {k: str(v) if v else None for k, v in gts.items()},
        "retrain_throughput": retrain,
        "notes": notes,
        "n_test": args.n_test or common.N_TEST,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "seconds": time.perf_counter() - t_start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    # smoke runs and other devices never overwrite the real (CPU) table
    stem_suffix = ("_smoke" if args.n_test else "") + (
        "" if device == "cpu" else "_" + device.replace(":", "")
    )
    (common.RESULTS_DIR / f"compare{stem_suffix}.json").write_text(json.dumps(out, indent=1))
    (common.RESULTS_DIR / f"compare{stem_suffix}.md").write_text(table + "\n")
    return 0


def render(
    rows: list[dict[str, Any]],
    repeats: int,
    args: argparse.Namespace,
    notes: list[str],
    retrain: Any,
) -> str:
    f = ours.fmt
    head = (
        "| model | method | ours (s) | dattri (s) | time ours/dattri | ours RSS (MB) | dattri RSS (MB) | "
        "RSS ours/dattri | ours working memory / bound (MB) | LDS ours | LDS dattri | agreement | goals |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        o, t = r.get("ours") or {}, r.get("dattri") or {}

        def cell(s: dict[str, Any], key: str, spec: str = ".2f") -> str:
            if not s:
                return "-"
            if not s.get("ok"):
                return "fail"
            return f(s.get(key), spec)

        goals = []
        if r.get("time_ratio") is not None:
            goals.append(("✓" if r["time_ratio"] <= GOAL_TIME_RATIO else "✗") + "time")
        if (
            o.get("lds") is not None
            and t.get("lds") is not None
            and o["lds"] == o["lds"]
            and t["lds"] == t["lds"]
        ):
            goals.append(("✓" if o["lds"] >= t["lds"] - GOAL_LDS_SLACK else "✗") + "LDS")
        if r.get("mem_bound_mb"):
            goals.append(("✓" if r["mem_work_mb"] <= r["mem_bound_mb"] else "✗") + "mem")
        name = r["method"] + (f" (dattri: {t['peer_method']})" if t.get("peer_method") else "")
        if t.get("from_previous_run"):
            name += " (dattri: previous run)"
        lines.append(
            f"| {r['model']} | {name} | {cell(o, 'time_total')} | {cell(t, 'time_total')} | {f(r.get('time_ratio'), '.2f')} | "
            f"{cell(o, 'ru_maxrss_mb', '.0f')} | {cell(t, 'ru_maxrss_mb', '.0f')} | {f(r.get('mem_ratio'), '.2f')} | "
            f"{f(r.get('mem_work_mb'), '.0f')} / {f(r.get('mem_bound_mb'), '.0f')} | "
            f"{cell(o, 'lds', '.3f')} | {cell(t, 'lds', '.3f')} | {f(r.get('agreement'), '.3f')} | {' '.join(goals) or '-'} |"
        )
    txt = "\n".join(lines)
    reps = (
        f"{repeats} run(s)"
        if not isinstance(repeats, dict)
        else "the runs named in the notes below"
    )
    txt += (
        f"\n\nMNIST 4,500 train x {args.n_test or common.N_TEST} test; one CPU thread per side; median of {reps} "
        "of cache + attribute (setup excluded); RSS = peak of the whole process; LDS: Spearman over "
        f"{common.GT_SPEC['num_subsets']} half-data retrainings, target -loss; agreement = mean per-test Pearson "
        "between the two score matrices; working memory = benchmarks/memory_bound.py (peak RSS growth of cache + "
        "attribute in a second run in the process), bound = 2 x (score matrix + model + one loader batch of "
        "gradients), float32 (issue 6's memory goal). "
        "Hyper-parameters: benchmarks/common.py METHODS."
    )
    failures = [
        (r["model"], r["method"], s, r[s].get("error", ""))
        for r in rows
        for s in ("ours", "dattri")
        if r.get(s) and not r[s].get("ok")
    ]
    for m, meth, s, err in failures:
        txt += f"\n- {s} {m}/{meth} failed: {err[:300]}"
    for r in rows:
        for s in ("ours", "dattri"):
            nf = (r.get(s) or {}).get("num_nonfinite")
            if nf:
                txt += f"\n- {s} {r['model']}/{r['method']}: {nf} non-finite scores"
    for n in notes:
        txt += f"\n- {n}"
    if retrain is not None:
        txt += (
            "\n\nGround-truth retraining throughput (benchmarks/retrain_throughput.py):\n"
            + "\n".join(_retrain_lines(retrain))
        )
    elif not args.no_retrain:
        txt += "\n\nGround-truth retraining throughput: benchmarks/retrain_throughput.py not present yet."
    return txt


if __name__ == "__main__":
    sys.exit(main())
