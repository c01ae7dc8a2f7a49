"""Expected compute cost of the four GPU settings (and the CPU ones, for scale).

Counts the floating-point operations of the real models with ``torch.utils.flop_counter``
(one training step = forward + backward, per sample, at the setting's input size) and
combines them with each benchmark config (``configs/benchmarks/<name>.yaml``: ensemble,
checkpoints, ground-truth subsets/runs/LOO indices) into total FLOPs per stage. GPU hours
are those FLOPs divided by an assumed *sustained* throughput (``--tflops``, default 10
TFLOP/s, a conservative figure for small-batch training on an A100-class card). Measured on
one NVIDIA H200 (issue 11): one ResNet-9 epoch of 5,000 CIFAR images in 0.35 s, about 60
TFLOP/s sustained, so on such a card the estimates below are roughly 6x too high for the
CIFAR settings; pass ``--tflops 60`` there (transformer settings are not measured yet).
The estimate covers training and the projected-gradient attributors (TRAK, TracIn / Grad-Dot
/ Grad-Cos); iterative IF on millions of parameters is not part of the GPU suite.

Calibration on this machine: the same FLOP count is taken for the ``*_tiny`` variants, one is
trained on ``--device`` (default CPU, one thread) and the achieved GFLOP/s printed, so the
model of cost can be checked against a real run.

Usage:
    .venv/bin/python benchmarks/gpu_cost.py [--tflops 10] [--json benchmarks/results/gpu_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tdabench.benchmark import get_setting  # noqa: E402
from tdabench.pipeline.config import load_yaml  # noqa: E402

BENCHMARKS = [
    "cifar2_resnet9",
    "cifar10_resnet9",
    "maestro_musictransformer",
    "shakespeare_nanogpt",
    "mnist_lr",
    "mnist_mlp",
]
PROJ_DIM = 512  # TRAK / TracIn projection width of configs/attributors
TRAK_MODELS = 10


def _example(setting, batch: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    dc = setting.data_config
    if setting.kind == "sequence":
        T = dc.get("seq_len") or dc.get("block_size")
        x = torch.randint(0, setting.num_classes, (batch, T))
        return (x,), x
    shape = (3, 32, 32) if setting.dataset == "cifar" else (1, 28, 28)
    return (torch.randn(batch, *shape),), torch.randint(0, setting.num_classes, (batch,))


def step_flops(setting, batch: int = 4) -> tuple[float, int]:
    """(training FLOPs per sample, number of parameters) of one forward + backward."""
    torch.manual_seed(0)
    model = setting.build_model().train()
    inputs, labels = _example(setting, batch)
    with FlopCounterMode(display=False) as fc:
        out = model(*inputs)
        logits = out.reshape(-1, out.shape[-1])
        torch.nn.functional.cross_entropy(logits, labels.reshape(-1)).backward()
    return fc.get_total_flops() / batch, sum(p.numel() for p in model.parameters())


def samples_per_model(setting) -> float:
    r = setting.recipe
    if r.get("max_iters"):
        return float(r["max_iters"] * r["batch_size"])
    return float(r["epochs"] * setting.n_train)


def estimate(name: str, tflops: float) -> dict:
    cfg = load_yaml(ROOT / "configs" / "benchmarks" / f"{name}.yaml")
    setting = get_setting(cfg["setting"], **(cfg.get("overrides") or {}))
    per_sample, n_params = step_flops(setting)
    per_model = per_sample * samples_per_model(setting)
    gt = cfg["groundtruth"]
    lds = gt["lds"]
    loo = gt["loo"]
    metrics = cfg.get("metrics") or list(setting.metrics)
    lds_models = lds["num_subsets"] * lds["num_runs_per_subset"] if "lds" in metrics else 0
    loo_models = (loo["num_indices"] + 1) * loo["num_runs"] if "loo" in metrics else 0
    train_models = cfg["train"]["ensemble"] + (1 if "auc" in metrics else 0)
    # a model trained on a subset sees that fraction of the samples (scaled stream batch)
    gt_flops = per_model * (lds_models * lds["subset_ratio"] + loo_models)
    train_flops = per_model * train_models
    n = setting.n_train + setting.n_test
    # per-sample gradient ~ one training step; projection 2 * d * k per gradient
    grad_cost = per_sample + 2.0 * n_params * PROJ_DIM
    trak_flops = TRAK_MODELS * n * grad_cost
    tracin_flops = cfg["train"]["checkpoints"] * n * grad_cost
    rate = tflops * 1e12
    return {
        "benchmark": name,
        "params": n_params,
        "train_gflop_per_sample": per_sample / 1e9,
        "samples_per_model": samples_per_model(setting),
        "models_ground_truth": lds_models + loo_models,
        "gpu_h_train": train_flops / rate / 3600,
        "gpu_h_ground_truth": gt_flops / rate / 3600,
        "gpu_h_trak10": trak_flops / rate / 3600,
        "gpu_h_tracin": tracin_flops / rate / 3600,
        "gpu_h_total": (train_flops + gt_flops + trak_flops + tracin_flops) / rate / 3600,
    }


def calibrate(name: str, device: str = "cpu") -> dict:
    """Train one ``*_tiny`` model on ``device`` and compare with its FLOP count."""
    from tdabench.groundtruth.trainer import make_trainer

    torch.set_num_threads(1)
    setting = get_setting(name)
    data = setting.load()
    per_sample, _ = step_flops(setting)
    trainer = make_trainer(setting, data, batched=False, device=device)
    masks = torch.ones(1, len(data.train[-1]), dtype=torch.bool)
    t = time.perf_counter()
    trainer.train(masks, [0])
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    flops = per_sample * samples_per_model(setting)
    return {
        "setting": name,
        "device": str(trainer.device),
        "seconds": sec,
        "gflop": flops / 1e9,
        "gflop_per_s": flops / sec / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tflops", type=float, default=10.0, help="assumed sustained GPU TFLOP/s")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/gpu_cost.json"))
    ap.add_argument("--no-calibrate", action="store_true")
    ap.add_argument(
        "--device", default="cpu", help="where the calibration model trains: cpu, cuda, auto"
    )
    args = ap.parse_args()
    rows = [estimate(b, args.tflops) for b in BENCHMARKS]
    cal = (
        []
        if args.no_calibrate
        else [
            calibrate(s, args.device)
            for s in ("maestro_musictransformer_tiny", "shakespeare_nanogpt_tiny")
        ]
    )
    head = (
        "| benchmark | params | train GFLOP/sample | samples/model | ground-truth models | "
        "GPU-h train | GPU-h ground truth | GPU-h TRAK-10 | GPU-h TracIn | GPU-h total |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['params'] / 1e6:.2f}M | {r['train_gflop_per_sample']:.3g} | "
            f"{r['samples_per_model']:.0f} | {r['models_ground_truth']} | {r['gpu_h_train']:.2f} | "
            f"{r['gpu_h_ground_truth']:.2f} | {r['gpu_h_trak10']:.2f} | {r['gpu_h_tracin']:.2f} | "
            f"{r['gpu_h_total']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"Assumed sustained throughput: {args.tflops:g} TFLOP/s (FLOPs counted by torch.utils.flop_counter)."
    )
    for c in cal:
        lines.append(
            f"Calibration: {c['setting']} trained on {c['device']} (1 thread) in {c['seconds']:.2f} s for "
            f"{c['gflop']:.3g} GFLOP = {c['gflop_per_s']:.2f} GFLOP/s achieved."
        )
    text = "\n".join(lines)
    print(text)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"tflops": args.tflops, "rows": rows, "calibration": cal}, indent=1))
    os.replace(tmp, out)
    out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
