"""TRAK with dense (Gaussian) vs sparse (CountSketch) projections: LDS over several projection seeds.

The JL projection is random, so one run's LDS difference between two projection kinds is partly
seed noise. This script runs TRAK (benchmarks/common.py METHODS hyper-parameters, same
checkpoints and LDS ground truth as compare.py) for ``--seeds`` projection seeds per kind and
prints the mean and standard deviation of the LDS and the median time per kind, side by side
in one run. One CPU thread, in-process.

Usage:
    PYTHONPATH=src .venv/bin/python benchmarks/projection_quality.py [--models lr mlp] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attribution_timing as ours
import common
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["lr", "mlp"], choices=list(common.MODELS))
    p.add_argument(
        "--methods", nargs="+", default=["trak_1", "trak_10"], choices=["trak_1", "trak_10"]
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--kinds",
        nargs="+",
        default=["gaussian", "sparse"],
        choices=["gaussian", "rademacher", "sparse"],
    )
    p.add_argument("--out", default=str(common.RESULTS_DIR / "projection_quality.json"))
    common.add_device_arg(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    jobs_dir = common.new_jobs_dir("projection_quality")
    gt_paths = {
        "lr": common.CACHE_DIR / "gt_lr.safetensors",
        "mlp": common.CACHE_DIR / "gt_mlp.safetensors",
    }
    rows = []
    for model_name in args.models:
        if not gt_paths[model_name].is_file():
            print(
                f"{model_name}: no ground truth at {gt_paths[model_name]}; run compare.py --setup-only"
                f"{' --mlp-gt' if model_name == 'mlp' else ''} first",
                file=sys.stderr,
            )
            continue
        paths = common.prepare_checkpoints(model_name)
        gt = common.load_ground_truth(gt_paths[model_name])
        for method in args.methods:
            for kind in args.kinds:
                lds, times = [], []
                for seed in range(args.seeds):
                    job = common.make_job(
                        "ours",
                        method,
                        model_name,
                        paths,
                        jobs_dir,
                        device=common.resolve_device(args.device),
                    )
                    job["hparams"] = copy.deepcopy(job["hparams"])
                    job["hparams"]["projector_kwargs"].update(
                        {"proj_type": kind, "proj_seed": seed}
                    )
                    scores, t = ours.build_and_run(job)
                    lds.append(common.lds(scores, *gt)[0])
                    times.append(t["time_total"])
                row = {
                    "model": model_name,
                    "method": method,
                    "proj_type": kind,
                    "lds": lds,
                    "time_s": times,
                    "lds_mean": statistics.mean(lds),
                    "lds_sd": statistics.stdev(lds) if len(lds) > 1 else 0.0,
                    "time_median_s": statistics.median(times),
                }
                rows.append(row)
                print(
                    f"{model_name:4} {method:8} {kind:10} LDS {row['lds_mean']:.3f} ± {row['lds_sd']:.3f} "
                    f"(seeds {', '.join(f'{v:.3f}' for v in lds)})  time {row['time_median_s']:.2f} s",
                    flush=True,
                )
    Path(args.out).write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
