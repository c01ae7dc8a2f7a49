"""Gauss-Newton influence functions on the harness's MNIST MLP (issue 12, item 1).

Measures LDS of IF with the GGN over all parameters (Arnoldi basis, with and without the
``1/λ`` complement outside the basis, and CG), against the harness's cached evaluation
ground truth (``gt_mlp.safetensors``: 50 subsets, seeds 2000+s). The damping ``λ`` is chosen
on a separate **held-out** ground truth built here (``--heldout-subsets`` halves with subset
seeds 7000+s and model seeds 8000+s, disjoint from the evaluation seeds), never on the
evaluation subsets.

    .venv/bin/python benchmarks/ggn_if.py --device cpu            # Arnoldi grid + CG at the chosen λ
    .venv/bin/python benchmarks/ggn_if.py --skip-cg               # Arnoldi grid only

Writes ``benchmarks/results/ggn_if.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from tdabench.algorithm import IFAttributorArnoldi, IFAttributorCG
from tdabench.task import AttributionTask

HELDOUT = {"seed": 7000, "model_seed_offset": 8000, "subset_ratio": 0.5}
DAMPINGS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]


def heldout_gt(num: int, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(neg_loss[S, n_test], indices[S, k])`` of ``num`` held-out subsets (cached at ``path``)."""
    if path.is_file():
        t, meta = common.read_safetensors(path)
        if int(meta.get("num", -1)) == num:
            return t["neg_loss"], t["indices"]
    data = common.load_data()
    k = int(common.N_TRAIN * HELDOUT["subset_ratio"])
    idx = [
        torch.randperm(
            common.N_TRAIN, generator=torch.Generator().manual_seed(HELDOUT["seed"] + s)
        )[:k]
        .sort()
        .values
        for s in range(num)
    ]
    seeds = [HELDOUT["model_seed_offset"] + s for s in range(num)]
    t0 = time.perf_counter()
    states, _ = common.train_many("mlp", data["x_train"], data["y_train"], idx, seeds)
    nl = torch.stack(
        [common.evaluate("mlp", st, data["x_test"], data["y_test"])["neg_loss"] for st in states]
    ).float()
    path.parent.mkdir(parents=True, exist_ok=True)
    common.write_safetensors(
        {"neg_loss": nl, "indices": torch.stack(idx)},
        path,
        {"num": str(num), **{k: str(v) for k, v in HELDOUT.items()}},
    )
    print(f"held-out ground truth: {num} subsets in {time.perf_counter() - t0:.0f}s", flush=True)
    return nl, torch.stack(idx)


def setup(device: str):
    data = common.load_data()
    paths = common.prepare_checkpoints("mlp")
    model = common.build_model("mlp")
    state = common.read_safetensors(paths["final"])[0]
    model.load_state_dict(state)
    model.eval()
    task = AttributionTask(common.make_loss_func(model), model, state)
    ld = common.loaders(data, {"cache": common.N_TRAIN, "train": 500, "test": 500})
    return task, ld, data


def arnoldi_grid(
    task, ld, device: str, rank: int, gts: dict, n_sub: int | None = None
) -> tuple[list[dict], float]:
    """One GGN Arnoldi basis; LDS for every damping, with and without the complement term."""
    t0 = time.perf_counter()
    att = IFAttributorArnoldi(
        task,
        device=device,
        hessian="ggn",
        ggn_output="cross_entropy",
        proj_dim=rank,
        max_iter=rank,
        tol=1e-10,
    )
    att.cache(ld["cache"])
    basis = att._solver_for(0).basis
    t_basis = time.perf_counter() - t0
    U, sig = basis.vectors, basis.values
    g_te = att._all_grads(ld["test"], "target", 0, "test loader")
    te_u = g_te @ U
    tr_u, dot = [], []
    for g in att._grads(ld["train"], "loss", 0, "train loader"):
        tr_u.append(g @ U)
        dot.append(g @ g_te.T)
    tr_u, dot = torch.cat(tr_u), torch.cat(dot)
    t_all = time.perf_counter() - t0
    rows = []
    for lam in DAMPINGS:
        low = (tr_u / (sig + lam)) @ te_u.T
        full = low - (tr_u / lam) @ te_u.T + dot / lam
        for variant, S in (("arnoldi", low), ("arnoldi residual=True", full)):
            row = {"variant": variant, "rank": rank, "damping": lam}
            for name, (values, indices) in gts.items():
                row[f"lds_{name}"] = common.lds(S, values, indices)[0]
                if n_sub:  # the same first test points as the CG rows
                    row[f"lds_{name}_first{n_sub}"] = common.lds(
                        S[:, :n_sub], values[:, :n_sub], indices
                    )[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        f"arnoldi rank {rank}: basis {t_basis:.1f}s, all {t_all:.1f}s; top eigenvalues {sig[:5].tolist()}",
        flush=True,
    )
    for row in rows:
        row["seconds"] = t_all
    return rows, t_all


def cg_row(
    task,
    ld,
    device: str,
    lam: float,
    max_iter: int,
    gts: dict,
    mode: str = "rev-rev",
    n_test: int | None = None,
) -> dict:
    """GGN CG scores (on the first ``n_test`` test points when given: CG costs one GGN product
    per test point and iteration, too slow for all 500 on a contended CPU)."""
    t0 = time.perf_counter()
    att = IFAttributorCG(
        task,
        device=device,
        hessian="ggn",
        ggn_output="cross_entropy",
        regularization=lam,
        max_iter=max_iter,
        tol=1e-6,
        mode=mode,
    )
    att.cache(ld["cache"])
    test = ld["test"] if n_test is None else ld["test_subset"]
    S = att.attribute(ld["train"], test)
    row = {
        "variant": f"cg ({max_iter} iterations)",
        "damping": lam,
        "seconds": time.perf_counter() - t0,
        "n_test": S.shape[1],
    }
    for name, (values, indices) in gts.items():
        row[f"lds_{name}"] = common.lds(S, values[:, : S.shape[1]], indices)[0]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--heldout-subsets", type=int, default=20)
    ap.add_argument(
        "--heldout-path",
        default=str(common.RESULTS_DIR / "jobs" / "ggn_heldout_gt_mlp.safetensors"),
    )
    ap.add_argument("--ranks", type=int, nargs="*", default=[200])
    ap.add_argument("--skip-cg", action="store_true")
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--cg-mode", default="rev-fwd")
    ap.add_argument(
        "--cg-n-test", type=int, default=None, help="CG on the first N test points only"
    )
    ap.add_argument(
        "--keep-rows", action="store_true", help="append to the rows of an existing ggn_if.json"
    )
    ap.add_argument(
        "--cg-dampings", type=float, nargs="*", default=None, help="default: the held-out choice"
    )
    args = ap.parse_args()
    common.one_thread()
    common.warm_torch()
    task, ld, data = setup(args.device)
    if args.cg_n_test:
        ld["test_subset"] = common.loaders(
            data, {"train": 500, "test": 500}, n_test=args.cg_n_test
        )["test"]
    gts = {
        "heldout": heldout_gt(args.heldout_subsets, Path(args.heldout_path)),
        "eval": common.load_ground_truth(common.CACHE_DIR / "gt_mlp.safetensors", "neg_loss"),
    }
    path = common.RESULTS_DIR / "ggn_if.json"
    rows = json.loads(path.read_text())["rows"] if args.keep_rows and path.is_file() else []
    for r in args.ranks:
        rows += arnoldi_grid(task, ld, args.device, r, gts, args.cg_n_test)[0]
    best = max(rows, key=lambda r: r["lds_heldout"])
    print("chosen on held-out:", json.dumps(best), flush=True)
    if not args.skip_cg:
        for lam in args.cg_dampings or [best["damping"]]:
            rows.append(
                cg_row(task, ld, args.device, lam, args.cg_iters, gts, args.cg_mode, args.cg_n_test)
            )
            write(rows, best, args)
    write(rows, best, args)


def write(rows: list[dict], best: dict, args: argparse.Namespace) -> None:
    out = {
        "rows": rows,
        "chosen": best,
        "heldout": HELDOUT | {"num_subsets": args.heldout_subsets},
        "machine": "shared 2-core CPU, contended",
        "threads": 1,
    }
    (common.RESULTS_DIR / "ggn_if.json").write_text(json.dumps(out, indent=1))
    subs = sorted({r["n_test"] for r in rows if r.get("n_test", common.N_TEST) < common.N_TEST})
    n = subs[0] if subs else None
    head = "| variant | rank | damping | LDS held-out | LDS eval |" + (
        f" LDS held-out / eval, first {n} test points |" if n else ""
    )
    lines = [head + " time (s) |", "|---|---|---|---|---|---|" + ("---|" if n else "")]
    for r in rows:
        partial = r.get("n_test", common.N_TEST) < common.N_TEST
        full = "| | |" if partial else f"| {r['lds_heldout']:.3f} | {r['lds_eval']:.3f} |"
        line = f"| {r['variant']} | {r.get('rank', '')} | {r['damping']:g} {full}"
        if n:
            pair = (
                (r["lds_heldout"], r["lds_eval"])
                if partial
                else (r.get(f"lds_heldout_first{n}"), r.get(f"lds_eval_first{n}"))
            )
            line += f" {pair[0]:.3f} / {pair[1]:.3f} |" if pair[0] is not None else " |"
        lines.append(line + f" {r['seconds']:.0f} |")
    intro = [
        "# Gauss-Newton influence functions, MNIST MLP (784-128-64-10, all 109,386 parameters)",
        "",
        '`benchmarks/ggn_if.py`: IF on the GGN (`hessian="ggn"`); damping chosen on a held-out ground truth '
        f"({args.heldout_subsets} halves, subset seeds {HELDOUT['seed']}+s, model seeds {HELDOUT['model_seed_offset']}+s), "
        "reported on the harness's evaluation ground truth (50 halves, seeds 2000+s), target -loss, one thread, "
        "shared 2-core CPU (contended: times are indicative only). "
        f"Chosen on held-out: {best['variant']}, rank {best.get('rank', '')}, damping {best['damping']:g} "
        f"-> LDS {best['lds_eval']:.3f} on the evaluation subsets.",
        "",
    ]
    (common.RESULTS_DIR / "ggn_if.md").write_text("\n".join(intro + lines) + "\n")


if __name__ == "__main__":
    main()
