"""DVEmb: tdabench's ``DVEmbAttributor`` vs dattri 0.3.0's, same training run, same data.

MNIST ``Linear(784, 10)`` (the harness's split and model, float32), one epoch of plain SGD
(lr 0.01, batch 32, loader order) on the first ``--n-train`` training digits from the same
initial weights; each side records the data value embeddings during its own run
(``cache_gradients`` before every step), then ``cache()`` and ``attribute`` on
``--n-test`` test digits. Exact gradients (no projection), so the two score matrices should
agree to float32 rounding. dattri runs as a black box in its own virtualenv
(``--dattri-python``) through ``benchmarks/peers/dattri_knn_dvemb.py``; one thread each.

Prints and writes ``benchmarks/results/dvemb.{json,md}``: time of record + cache + attribute
(median of ``--repeats``), the ratio ours/dattri and the largest relative difference.

    .venv/bin/python benchmarks/dvemb.py [--device cpu] [--n-train 500] [--n-test 50]
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
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from tdabench.algorithm import DVEmbAttributor
from tdabench.task import AttributionTask


def _ours(x, y, xt, yt, w0, b0, lr: float, bs: int, device: str) -> tuple[np.ndarray, float]:
    model = common.build_model("lr").to(device)
    with torch.no_grad():
        model.fc.weight.copy_(w0)
        model.fc.bias.copy_(b0)
    x, y, xt, yt = (t.to(device) for t in (x, y, xt, yt))
    task = AttributionTask(common.make_loss_func(model), model, model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    att = DVEmbAttributor(task)
    for start in range(0, len(y), bs):
        idx = torch.arange(start, min(len(y), start + bs), device=device)
        att.cache_gradients(0, (x[idx], y[idx]), idx, lr)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    att.cache()
    s = att.attribute(DataLoader(TensorDataset(xt, yt), batch_size=len(yt)))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return s.detach().double().cpu().numpy(), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--dattri-python",
        default=os.environ.get("TDABENCH_DATTRI_PYTHON", "/work/peers/dattri/bin/python"),
    )
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "dvemb")
    ap.add_argument("--machine", default="")
    args = ap.parse_args()
    common.one_thread()
    common.warm_torch()
    data = common.load_data()
    x, y = data["x_train"][: args.n_train], data["y_train"][: args.n_train]
    xt, yt = data["x_test"][: args.n_test], data["y_test"][: args.n_test]
    torch.manual_seed(0)
    init = common.build_model("lr")
    w0, b0 = init.fc.weight.detach().clone(), init.fc.bias.detach().clone()
    lr, bs = 0.01, 32
    ours, t_ours = None, []
    for _ in range(args.repeats):
        ours, t = _ours(x, y, xt, yt, w0, b0, lr, bs, args.device)
        t_ours.append(t)
    t_theirs = []
    with tempfile.TemporaryDirectory(prefix="dvemb_dattri_") as tmp:
        d = Path(tmp)
        for name, t in (
            ("x_train", x),
            ("y_train", y),
            ("x_test", xt),
            ("y_test", yt),
            ("w0", w0),
            ("b0", b0),
        ):
            np.save(d / f"{name}.npy", t.numpy(), allow_pickle=False)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        env.pop("PYTHONPATH", None)
        runner = Path(__file__).resolve().parent / "peers" / "dattri_knn_dvemb.py"
        for _ in range(args.repeats):
            cmd = [
                args.dattri_python,
                str(runner),
                "dvemb",
                "--inputs",
                str(d),
                "--out",
                str(d / "out"),
                "--lr",
                str(lr),
                "--batch-size",
                str(bs),
            ]
            subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
            t_theirs.append(json.loads((d / "out" / "result.json").read_text())["seconds"])
        theirs = np.load(d / "out" / "scores.npy", allow_pickle=False)
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    res = {
        "setting": f"MNIST LR, {args.n_train} train x {args.n_test} test, 1 epoch SGD lr {lr} batch {bs}, no projection, float32",
        "device": args.device,
        "machine": args.machine or platform.node(),
        "threads": 1,
        "ours_seconds": t_ours,
        "dattri_seconds": t_theirs,
        "time_ratio_ours_over_dattri": mo / mt,
        "max_abs_diff_over_max_abs": rel,
    }
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = (
        "| setting | device | ours (s, median) | dattri 0.3.0 (s, median) | ours/dattri | max abs diff / max abs |\n"
        "|---|---|---|---|---|---|\n"
        f"| {res['setting']} | {args.device} | {mo:.2f} | {mt:.2f} | {mo / mt:.3f} | {rel:.1e} |\n"
    )
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
