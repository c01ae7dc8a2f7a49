"""Black-box runner for dattri 0.3.0 ``retrain_lds`` (run with the dattri virtualenv's python).

Called by ``benchmarks/retrain_throughput.py``; it only imports dattri's public API and
writes one JSON line with the wall and CPU time of an untimed warm-up and then the ``retrain_lds`` call to stdout.

Usage:
    .peer-venvs/dattri/bin/python benchmarks/peers/dattri_retrain.py \
        --data DATA.npz --model lr --epochs 20 --batch-size 32 --num-models 4 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from torch import nn


def mlp_train_func(dataloader, seed=0, epoch_num=50):
    """A user train_func as dattri's docs show it: 784-128-10 MLP, SGD lr 0.01 momentum 0.9."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(epoch_num):
        for inputs, labels in dataloader:
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", choices=["lr", "mlp"], required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--num-models", type=int, required=True)
    ap.add_argument("--subset-ratio", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from dattri.model_util.retrain import retrain_lds

    if args.model == "lr":
        # dattri's own MNIST-10 LR recipe (Linear(784, 10), SGD lr 0.01)
        from dattri.benchmark.datasets.mnist.mnist_lr import train_mnist_lr as train_func
    else:
        train_func = mlp_train_func

    arrays = np.load(args.data)
    dataset = torch.utils.data.TensorDataset(
        torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    # untimed warm-up (first optimiser step / lazy torch imports), as for our trainers
    w0 = time.perf_counter()
    retrain_lds(
        train_func,
        loader,
        os.path.join(args.out, "warmup"),
        num_subsets=1,
        subset_ratio=args.subset_ratio,
        seed=args.seed + 10_000,
        epoch_num=1,
    )
    warmup = time.perf_counter() - w0
    t0, c0 = time.perf_counter(), time.process_time()
    retrain_lds(
        train_func,
        loader,
        args.out,
        num_subsets=args.num_models,
        subset_ratio=args.subset_ratio,
        seed=args.seed,
        epoch_num=args.epochs,
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "warmup_s": warmup,
                "num_models": args.num_models,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "pid": os.getpid(),
            }
        )
    )


if __name__ == "__main__":
    main()
