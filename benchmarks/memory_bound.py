"""Issue 6's memory goal: working memory of cache + attribute vs 2 x (scores + model + one batch of gradients).

For every METHODS row (tdabench only), runs the job in a fresh process twice in a row
(``attribution_timing.second_run_peak_mb``): the first run pays the one-time costs (lazily loaded
code and kernels, allocator arenas: ~80 MB on this machine, independent of the problem), then
freed memory is returned to the OS and the peak RSS growth of the second run is the working
memory of the method, score matrix included. Bound: ``common.memory_bound_mb`` (float32 score
matrix + model + the largest loader batch of per-sample gradients, times 2). Linux only.

Usage:
    PYTHONPATH=src .venv/bin/python benchmarks/memory_bound.py [--models lr mlp] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attribution_timing as ours
import common


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(common.MODELS), choices=list(common.MODELS))
    p.add_argument(
        "--methods", nargs="+", default=list(common.METHODS), choices=list(common.METHODS)
    )
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--out", default=str(common.RESULTS_DIR / "memory_bound.json"))
    common.add_device_arg(p)
    args = p.parse_args(argv)
    device = common.resolve_device(
        args.device
    )  # host RSS is measured either way (plus peak_gpu_mb on CUDA)
    jobs_dir = common.new_jobs_dir("memory_bound")
    rows = []
    print(
        "| model | method | working memory (MB) | bound (MB) | memory / bound | goal |\n|---|---|---|---|---|---|"
    )
    for model_name in args.models:
        paths = common.prepare_checkpoints(model_name)
        for method in args.methods:
            job = common.make_job("ours", method, model_name, paths, jobs_dir, device=device)
            job["memory_only"] = True
            res = common.run_job(ours.OURS_CMD, job, args.timeout, None)
            bound = common.memory_bound_mb(model_name, method)
            peak = res.get("work_mb") if res.get("ok") else None
            row = {
                "model": model_name,
                "method": method,
                "work_mb": peak,
                "bound_mb": bound,
                "ratio": None if peak is None else peak / bound,
                "ok": res.get("ok"),
                "error": res.get("error"),
            }
            rows.append(row)
            goal = "-" if peak is None else ("✓" if peak <= bound else "✗")
            print(
                f"| {model_name} | {method} | {ours.fmt(peak, '.0f')} | {bound:.0f} | {ours.fmt(row['ratio'], '.2f')} | {goal} |",
                flush=True,
            )
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
