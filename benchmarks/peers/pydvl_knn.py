"""pyDVL 0.10 KNN-Shapley, run as a black box inside pyDVL's own virtualenv.

Usage (by ``benchmarks/knn_shapley.py``)::

    /work/peers/pydvl/bin/python benchmarks/peers/pydvl_knn.py --inputs DIR --k 5 --out DIR

``DIR`` holds ``x_train.npy``, ``y_train.npy``, ``x_test.npy``, ``y_test.npy`` (read with
``allow_pickle=False``). Writes ``values.npy`` (``(n_train,)``, the mean over test points of
the per-test KNN-Shapley values, pyDVL's public ``KNNShapleyValuation`` result in data-index
order) and ``result.json`` with the seconds of ``fit`` (one process, one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from pydvl.valuation.dataset import Dataset
    from pydvl.valuation.methods.knn_shapley import KNNShapleyValuation
    from sklearn.neighbors import KNeighborsClassifier

    def load(name: str) -> np.ndarray:
        return np.load(args.inputs / f"{name}.npy", allow_pickle=False)

    train = Dataset(load("x_train"), load("y_train"))
    test = Dataset(load("x_test"), load("y_test"))
    times, values = [], None
    for _ in range(args.repeats):
        valuation = KNNShapleyValuation(
            KNeighborsClassifier(n_neighbors=args.k), test, progress=False
        )
        t0 = time.perf_counter()
        valuation.fit(train)
        times.append(time.perf_counter() - t0)
        res = valuation.result
        order = np.argsort(res.indices)
        values = np.asarray(res.values, dtype=np.float64)[order]
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "values.npy", values, allow_pickle=False)
    import pydvl

    (args.out / "result.json").write_text(
        json.dumps(
            {
                "seconds": times,
                "pydvl": pydvl.__version__,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            }
        )
    )


if __name__ == "__main__":
    main()
