"""Does bf16 autocast change the ground truth? Noise ceilings of an fp32 and a bf16 LDS ground truth.

    PYTHONPATH=src .venv/bin/python benchmarks/autocast_noise.py [--device cpu|cuda] [--model mlp|resnet9]

Trains the same LDS ground truth (``--subsets`` random halves x 2 seeds, the batched trainer,
shared minibatch stream) once in float32 and once with the recipe's ``autocast: "bf16"``, and
reports for each the noise ceiling (``tdabench.metric.noise_ceiling``: Spearman over subsets
between the two seeds, Spearman-Brown corrected, mean over test points) and, between the two
ground truths, the per-test Spearman over subsets of the seed-averaged targets. A config may use
bf16 only when its noise ceiling is unchanged.

Models: ``mlp`` (784-128-10 ReLU on the MNIST digits of benchmarks/common.py, SGD lr 0.01
momentum 0.9, batch 64) or ``resnet9`` (the ``*_tiny`` widths (8, 16, 32, 32) on the MNIST digits
padded to 3 x 32 x 32, SGD lr 0.01 momentum 0.9, batch 64). Writes
``benchmarks/results/autocast_noise_<model>_<device>.json``.
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
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402

from tdabench.benchmark.models import ResNet9  # noqa: E402
from tdabench.groundtruth.trainer import BatchedTrainer  # noqa: E402
from tdabench.metric import mean_dropna, noise_ceiling, spearman_columns  # noqa: E402


def problem(model: str, n_train: int, n_test: int):
    d = common.load_data()
    x, y, xt, yt = (
        d["x_train"][:n_train],
        d["y_train"][:n_train],
        d["x_test"][:n_test],
        d["y_test"][:n_test],
    )
    if model == "mlp":
        return (
            (x.reshape(n_train, -1), y),
            (xt.reshape(n_test, -1), yt),
            lambda: nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)),
        )

    def img(t):  # 28x28 digits -> 3 x 32 x 32
        return F.pad(t.reshape(-1, 1, 28, 28), (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()

    return (
        (img(x), y),
        (img(xt), yt),
        lambda: ResNet9(num_classes=10, widths=(8, 16, 32, 32), dropout=0.0),
    )


def ground_truth(build, train, test, recipe, masks, device):
    """``(S, 2, n_test)`` margins: every subset trained with two seeds."""
    tr = BatchedTrainer(build, train, test, recipe, stream_seed=0, device=device)
    s = masks.shape[0]
    both = torch.cat([masks, masks])
    seeds = [1000 + i for i in range(s)] + [2000 + i for i in range(s)]
    t0 = time.perf_counter()
    values = tr.evaluate(tr.train(both, seeds), "margin")
    return values.view(2, s, -1).transpose(0, 1), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="mlp", choices=["mlp", "resnet9"])
    p.add_argument("--subsets", type=int, default=40)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    train, test, build = problem(args.model, args.n_train, args.n_test)
    g = torch.Generator().manual_seed(7)
    masks = torch.stack(
        [torch.randperm(args.n_train, generator=g) < args.n_train // 2 for _ in range(args.subsets)]
    )
    recipe = dict(optimizer="sgd", lr=0.01, momentum=0.9, epochs=args.epochs, batch_size=64)
    out = {"args": vars(args), "recipe": recipe, "torch": torch.__version__}
    gts = {}
    for name, extra in (("fp32", {}), ("bf16", {"autocast": "bf16"})):
        v, sec = ground_truth(build, train, test, {**recipe, **extra}, masks, args.device)
        gts[name] = v
        nc = noise_ceiling(v)
        out[name] = {
            "noise_ceiling": mean_dropna(nc.ceiling)[0],
            "run_corr": mean_dropna(nc.run_corr)[0],
            "seconds": sec,
        }
        print(
            f"{name}: noise ceiling {out[name]['noise_ceiling']:.4f} (seed-pair Spearman "
            f"{out[name]['run_corr']:.4f}), {sec:.0f} s",
            flush=True,
        )
    agree = spearman_columns(
        gts["fp32"].mean(1).double().numpy(), gts["bf16"].mean(1).double().numpy()
    )[0]
    out["fp32_vs_bf16_spearman"] = mean_dropna(agree)[0]
    print(
        f"fp32 vs bf16 ground truth (seed-averaged), per-test Spearman over subsets: {out['fp32_vs_bf16_spearman']:.4f}"
    )
    path = (
        ROOT
        / "benchmarks"
        / "results"
        / f"autocast_noise_{args.model}_{args.device.replace(':', '')}.json"
    )
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
