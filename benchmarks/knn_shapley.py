"""KNN-Shapley: tdabench's ``KNNShapleyAttributor`` vs pyDVL 0.10's ``KNNShapleyValuation``.

Same embeddings for both (the harness's MNIST split, raw pixels /255, 784-d; 4,500 train /
500 test), same ``K``. pyDVL runs as a black box in its own virtualenv
(``--pydvl-python``, default ``/work/peers/pydvl/bin/python``) through
``benchmarks/peers/pydvl_knn.py``; both sides use one thread. pyDVL returns the mean over
test points of each training sample's value, so ours is averaged over the test axis too.

Prints and writes ``benchmarks/results/knn_shapley.{json,md}``: the largest absolute
difference of the values (goal <= 1e-6) and the median time ratio ours/pyDVL (goal <= 0.5).

    .venv/bin/python benchmarks/knn_shapley.py [--device cpu] [--k 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from tdabench.algorithm import KNNShapleyAttributor


def _ours(
    data: dict, k: int, device: str, repeats: int, n_test: int
) -> tuple[np.ndarray, list[float]]:
    xtr, ytr = data["x_train"].double().to(device), data["y_train"].to(device)
    xte, yte = data["x_test"][:n_test].double().to(device), data["y_test"][:n_test].to(device)
    # the attributor takes any iterable of batches: pass the collated tensors, as pyDVL gets arrays
    # (a DataLoader over a TensorDataset would add ~0.2 s of per-sample indexing and collation)
    train, test = [(xtr, ytr)], [(xte, yte)]
    times, values = [], None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        att = KNNShapleyAttributor(k_neighbors=k, device=device)
        v = att.attribute(train, test)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        values = v.mean(dim=0).cpu().numpy()  # v is (n_test, n_train): mean over test points
    return values, times


def _ours_full(data: dict, k: int, device: str, n_test: int) -> tuple[np.ndarray, list[float]]:
    xtr, ytr = data["x_train"].double().to(device), data["y_train"].to(device)
    xte, yte = data["x_test"][:n_test].double().to(device), data["y_test"][:n_test].to(device)
    times, v = [], None
    for _ in range(3):
        t0 = time.perf_counter()
        v = KNNShapleyAttributor(k_neighbors=k, device=device).attribute([(xtr, ytr)], [(xte, yte)])
        times.append(time.perf_counter() - t0)
    return v.cpu().numpy(), times  # (n_test, n_train), dattri's layout


def _pydvl(data: dict, k: int, python: str, repeats: int, n_test: int) -> tuple[np.ndarray, dict]:
    with tempfile.TemporaryDirectory(prefix="knn_pydvl_") as tmp:
        d = Path(tmp)
        for name in ("x_train", "y_train"):
            np.save(
                d / f"{name}.npy",
                data[name].double().numpy() if name.startswith("x") else data[name].numpy(),
            )
        np.save(d / "x_test.npy", data["x_test"][:n_test].double().numpy())
        np.save(d / "y_test.npy", data["y_test"][:n_test].numpy())
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
        }
        env.pop("PYTHONPATH", None)
        runner = Path(__file__).resolve().parent / "peers" / "pydvl_knn.py"
        cmd = [
            python,
            str(runner),
            "--inputs",
            str(d),
            "--k",
            str(k),
            "--out",
            str(d / "out"),
            "--repeats",
            str(repeats),
        ]
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        return np.load(d / "out" / "values.npy", allow_pickle=False), json.loads(
            (d / "out" / "result.json").read_text()
        )


def _dattri(data: dict, k: int, python: str, n_test: int) -> tuple[np.ndarray, float]:
    """dattri 0.3.0's KNNShapleyAttributor (black box); its values as (n_test, n_train)."""
    with tempfile.TemporaryDirectory(prefix="knn_dattri_") as tmp:
        d = Path(tmp)
        np.save(d / "x_train.npy", data["x_train"].double().numpy())
        np.save(d / "y_train.npy", data["y_train"].numpy())
        np.save(d / "x_test.npy", data["x_test"][:n_test].double().numpy())
        np.save(d / "y_test.npy", data["y_test"][:n_test].numpy())
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        env.pop("PYTHONPATH", None)
        runner = Path(__file__).resolve().parent / "peers" / "dattri_knn_dvemb.py"
        cmd = [
            python,
            str(runner),
            "knn",
            "--inputs",
            str(d),
            "--out",
            str(d / "out"),
            "--k",
            str(k),
        ]
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        return np.load(d / "out" / "scores.npy", allow_pickle=False), json.loads(
            (d / "out" / "result.json").read_text()
        )["seconds"]


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-test", type=int, default=common.N_TEST)
    ap.add_argument(
        "--pydvl-python",
        default=os.environ.get("TDABENCH_PYDVL_PYTHON", "/work/peers/pydvl/bin/python"),
    )
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "knn_shapley")
    ap.add_argument(
        "--machine", default="", help="a description of the machine, recorded in the JSON"
    )
    ap.add_argument(
        "--dattri-python",
        default=os.environ.get("TDABENCH_DATTRI_PYTHON", "/work/peers/dattri/bin/python"),
        help="dattri 0.3.0's python ('' to skip the dattri row)",
    )
    ap.add_argument(
        "--dattri-n-test", type=int, default=50, help="test points for the (slow) dattri row"
    )
    return ap.parse_args()


def _dattri_row(data: dict, args: argparse.Namespace) -> dict:
    """Both sides' full ``(n_test, n_train)`` values on the first ``--dattri-n-test`` points."""
    m = min(args.dattri_n_test, args.n_test)
    d_vals, d_sec = _dattri(data, args.k, args.dattri_python, m)
    o_vals, o_times = _ours_full(data, args.k, args.device, m)
    return {
        "n_test": m,
        "dattri_seconds": d_sec,
        "ours_seconds": o_times,
        "time_ratio_ours_over_dattri": statistics.median(o_times) / d_sec,
        "max_abs_diff": float(np.abs(o_vals - d_vals).max()),
        "note": "both return (n_test, n_train) (dattri's layout); dattri's values are float32",
    }


def _markdown(res: dict, device: str) -> str:
    med_o, med_p = statistics.median(res["ours_seconds"]), statistics.median(res["pydvl_seconds"])
    md = (
        "| setting | device | ours (s, median) | pyDVL 0.10 (s, median) | ours/pyDVL | max abs diff |\n|---|---|---|---|---|---|\n"
        f"| {res['setting']} | {device} | {med_o:.3f} | {med_p:.3f} | {med_o / med_p:.4f} | {res['max_abs_diff']:.2e} |\n"
    )
    if "dattri" in res:
        r = res["dattri"]
        md += (
            f"| same, {r['n_test']} test points, vs dattri 0.3.0 | {device} | {statistics.median(r['ours_seconds']):.3f} "
            f"| dattri {r['dattri_seconds']:.3f} | {r['time_ratio_ours_over_dattri']:.4f} | {r['max_abs_diff']:.2e} |\n"
        )
    return md


def main() -> None:
    args = _parse()
    common.one_thread()
    data = common.load_data()
    ours, t_ours = _ours(data, args.k, args.device, args.repeats, args.n_test)
    theirs, peer = _pydvl(data, args.k, args.pydvl_python, args.repeats, args.n_test)
    diff = float(np.abs(ours - theirs).max())
    ratio = statistics.median(t_ours) / statistics.median(peer["seconds"])
    res = {
        "setting": f"MNIST raw pixels, {len(ours)} train x {args.n_test} test, K={args.k}",
        "device": args.device,
        "machine": args.machine or platform.node(),
        "threads": 1,
        "ours_seconds": t_ours,
        "pydvl_seconds": peer["seconds"],
        "pydvl_version": peer["pydvl"],
        "time_ratio_ours_over_pydvl": ratio,
        "max_abs_diff": diff,
        "goal_values_1e-6": diff <= 1e-6,
        "goal_time_le_0.5x": ratio <= 0.5,
    }
    if args.dattri_python:
        res["dattri"] = _dattri_row(data, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = _markdown(res, args.device)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(
        f"values equal to 1e-6: {res['goal_values_1e-6']}; time ratio {ratio:.4f} (goal <= 0.5): {res['goal_time_le_0.5x']}"
    )


if __name__ == "__main__":
    main()
