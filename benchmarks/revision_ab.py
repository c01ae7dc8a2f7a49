"""Time tdabench's attributors at two git revisions, side by side, on the harness (A/B).

    .venv/bin/python benchmarks/revision_ab.py --base 50dd836 [--head HEAD] [--models lr]
        [--methods if_cg tracin ...] [--repeats 3] [--device cpu]

A refactor promises "no behaviour change, timings within 5%": this script checks both on the
machine at hand, where an absolute table from another day (``compare.md``) cannot. Each revision's
``src/`` is exported with ``git archive`` into a scratch folder and put first on ``PYTHONPATH`` of
the job processes, so the harness (this checkout's ``benchmarks/``: data, checkpoints, the METHODS
table, ``attribution_timing.py --job``) is the same for both and only the library differs. Jobs
alternate base, head, base, head ... per method, one CPU thread each, so load drifts hit both
sides alike. Reported per row: median time of ``cache + attribute`` for each side, the ratio
head/base, and the largest absolute difference between the two revisions' scores (0 = identical).
Results: ``benchmarks/results/revision_ab.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attribution_timing
import common
import torch


def export_src(rev: str, dest: Path) -> Path:
    """``src/`` of ``rev`` under ``dest``; returns the folder to put on PYTHONPATH."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(common.ROOT), "archive", rev, "src"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def run_side(src: Path, job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One job with ``src`` first on the child's PYTHONPATH."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(src) + (os.pathsep + old if old else "")
    try:
        return common.run_job(attribution_timing.OURS_CMD, job, args.timeout, args.mem_limit_gb)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def measure(srcs: dict[str, Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Alternating base/head jobs per (model, method); one row each."""
    device = common.resolve_device(args.device)
    jobs_dir = common.new_jobs_dir("revision_ab")
    rows = []
    for model_name in args.models:
        paths = common.prepare_checkpoints(model_name)
        for method in args.methods:
            runs: dict[str, list[dict[str, Any]]] = {side: [] for side in srcs}
            for rep in range(args.repeats):
                for side, src in srcs.items():
                    job = common.make_job(
                        side, method, model_name, paths, jobs_dir, None, rep, device=device
                    )
                    runs[side].append(run_side(src, job, args))
            row = {"model": model_name, "method": method}
            for side in srcs:
                row[side] = common.summarize(runs[side])
            row.update(compare_rows(row["base"], row["head"]))
            rows.append(row)
            print(format_row(row), file=sys.stderr, flush=True)
    return rows


def compare_rows(base: dict[str, Any], head: dict[str, Any]) -> dict[str, Any]:
    """Time ratio head/base and the largest score difference of the last repetitions."""
    if not (base["ok"] and head["ok"]):
        return {"ratio": None, "max_abs_diff": None}
    a = common.read_safetensors(base["scores_path"])[0]["scores"]
    b = common.read_safetensors(head["scores_path"])[0]["scores"]
    diff = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
    return {"ratio": head["time_total"] / base["time_total"], "max_abs_diff": diff}


def format_row(r: dict[str, Any]) -> str:
    fmt = attribution_timing.fmt
    if r["ratio"] is None:
        err = r["base"].get("error") or r["head"].get("error") or ""
        return f"| {r['model']} | {r['method']} | failed: {err[:100]} | | | |"
    return (
        f"| {r['model']} | {r['method']} | {fmt(r['base']['time_total'])} | "
        f"{fmt(r['head']['time_total'])} | {fmt(r['ratio'])} | {r['max_abs_diff']:.2e} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", required=True, help="the revision to compare against")
    p.add_argument("--head", default="HEAD", help="the revision under test (default HEAD)")
    p.add_argument("--models", nargs="+", default=["lr"], choices=list(common.MODELS))
    p.add_argument("--methods", nargs="+", default=["if_cg", "tracin", "grad_dot", "trak_10"])
    p.add_argument("--repeats", type=int, default=3, help="alternating repetitions per side")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--mem-limit-gb", type=float, default=12.0)
    common.add_device_arg(p)
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in common.METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {sorted(common.METHODS)}")
    with tempfile.TemporaryDirectory(prefix="tdabench-ab-") as tmp:
        srcs = {
            "base": export_src(args.base, Path(tmp) / "base"),
            "head": export_src(args.head, Path(tmp) / "head"),
        }
        rows = measure(srcs, args)
    head = ["| model | method | base (s) | head (s) | head/base | max abs score diff |"]
    lines = [*head, "|---|---|---|---|---|---|", *(format_row(r) for r in rows)]
    note = (
        f"\nbase = {args.base}, head = {args.head}; median of {args.repeats} alternating runs per "
        f"side, cache + attribute, one CPU thread, device {args.device}, torch {torch.__version__}."
    )
    table = "\n".join(lines) + "\n" + note
    print(table)
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (common.RESULTS_DIR / "revision_ab.json").write_text(
        json.dumps({"base": args.base, "head": args.head, "rows": rows}, indent=1, default=str)
    )
    (common.RESULTS_DIR / "revision_ab.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
