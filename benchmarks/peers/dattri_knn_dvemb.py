"""Peer runner: dattri 0.3.0's KNNShapleyAttributor / DVEmbAttributor, INSIDE the dattri virtualenv.

Usage (by ``benchmarks/knn_shapley.py --dattri-python`` and ``benchmarks/dvemb.py``)::

    /work/peers/dattri/bin/python benchmarks/peers/dattri_knn_dvemb.py {knn,dvemb} --inputs DIR --out DIR [...]

Inputs are ``.npy`` files (read with ``allow_pickle=False``): ``x_train``, ``y_train``,
``x_test``, ``y_test`` and, for ``dvemb``, the initial weights ``w0`` / ``b0`` of the
``Linear(784, 10)`` model. Public API only (no code copied):

- ``KNNShapleyAttributor(k_neighbors, distance_func=f)`` with ``f(test_batch, train_batch) =
  cdist``; ``attribute(train_loader, test_loader, train_labels, test_labels)``; dattri returns
  ``(n_test, n_train)``, written as is.
- ``DVEmbAttributor(task, proj_dim=None, factorization_type="none")``; during plain SGD
  (``lr``, ``--batch-size``, one epoch in loader order) ``cache_gradients(epoch, batch,
  indices, lr)`` before each step; then ``cache()`` and ``attribute(test_loader)``.

Writes ``scores.npy`` and ``result.json`` (seconds of the timed part, one thread).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ -> import common

import common
from torch.utils.data import DataLoader, TensorDataset


def _load(d: Path, name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(d / f"{name}.npy", allow_pickle=False))


def knn(args: argparse.Namespace) -> tuple[np.ndarray, float]:
    from dattri.algorithm.data_shapley import KNNShapleyAttributor

    xtr, ytr, xte, yte = (_load(args.inputs, n) for n in ("x_train", "y_train", "x_test", "y_test"))
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=len(ytr))
    test = DataLoader(TensorDataset(xte, yte), batch_size=len(yte))

    def dist(test_batch, train_batch):
        return torch.cdist(test_batch[0], train_batch[0])

    t0 = time.perf_counter()
    att = KNNShapleyAttributor(k_neighbors=args.k, distance_func=dist)
    sv = att.attribute(train, test, ytr, yte)
    return sv.double().numpy(), time.perf_counter() - t0


def dvemb(args: argparse.Namespace) -> tuple[np.ndarray, float]:
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.task import AttributionTask

    xtr, ytr, xte, yte = (_load(args.inputs, n) for n in ("x_train", "y_train", "x_test", "y_test"))
    model = common.build_model("lr")
    with torch.no_grad():
        model.fc.weight.copy_(_load(args.inputs, "w0"))
        model.fc.bias.copy_(_load(args.inputs, "b0"))
    task = AttributionTask(
        loss_func=common.make_loss_func(model), model=model, checkpoints=model.state_dict()
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    att = DVEmbAttributor(task=task, proj_dim=None, factorization_type="none")
    for start in range(0, len(ytr), args.batch_size):
        idx = torch.arange(start, min(len(ytr), start + args.batch_size))
        att.cache_gradients(0, (xtr[idx], ytr[idx]), idx, args.lr)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    att.cache()
    scores = att.attribute(DataLoader(TensorDataset(xte, yte), batch_size=len(yte)))
    return scores.detach().double().numpy(), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["knn", "dvemb"])
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    common.one_thread()
    common.warm_torch()
    scores, seconds = knn(args) if args.mode == "knn" else dvemb(args)
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "scores.npy", scores, allow_pickle=False)
    import dattri

    (args.out / "result.json").write_text(
        json.dumps({"seconds": seconds, "dattri": getattr(dattri, "__version__", "0.3.0")})
    )


if __name__ == "__main__":
    main()
