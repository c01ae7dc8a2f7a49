"""GPU side-by-side: tdabench vs dattri 0.3.0 on one device (issue 11), in one run.

    .venv/bin/python benchmarks/gpu_compare.py --device cuda [--dattri-python PATH|same|none]
    .venv/bin/python benchmarks/gpu_compare.py --device cpu --small      # CPU dry run of the whole harness
    .venv/bin/python benchmarks/gpu_compare.py --device cpu --small --dry-run --out /tmp/x   # plumbing only

Three sections, every row a fresh process with a timeout (``--row-timeout``) and the whole run
under ``--budget`` seconds (rows past it are listed as skipped):

1. **MNIST MLP** (benchmarks/common.py: 4,500 train x 500 test real digits, the cached
   checkpoints and LDS ground truth, the one METHODS table both sides use): IF explicit / CG /
   LiSSA / Arnoldi (last layer), TracInCP, Grad-Dot, Grad-Cos, RPS, TRAK-1, TRAK-10. Our side runs
   ``attribution_timing.py --job``, dattri's ``peers/dattri_attribute.py`` (black box), both with
   the job's ``device``. Time of cache + attribute, peak GPU memory
   (``torch.cuda.max_memory_allocated``; peak RSS on the CPU) and LDS for both sides.
2. **ResNet-9, CIFAR-shaped** random data (5,000 x 500, 3x32x32, 10 classes; the models are
   randomly initialised: a speed and memory comparison, no ground truth), projection 2,048:
   TRAK-1, TRAK-10, TracInCP (10 checkpoints), Grad-Dot, IF explicit on the last layer (``fc``),
   plus EK-FAC / LoGra when ``tdabench.algorithm`` has those classes (skipped with a note if not).
   Both sides run this file's ``--job`` runner with the same plain-torch ResNet-9 (below; the
   architecture of ``tdabench.benchmark.models.ResNet9``, 4,829,258 parameters).
3. **Retraining throughput** (ours only: batched vs sequential trainer, models/s, same masks,
   seeds and stream): LR and MLP on the MNIST digits, ResNet-9 on CIFAR-shaped data (goal:
   batched >= 4x sequential for ResNet-9), with the largest difference between the two
   trainers' first model as a sanity check.

dattri: ``--dattri-python PATH`` (a python that imports dattri 0.3.0), ``same`` (this python,
e.g. a GPU machine with torch + dattri in one env) or ``none``; default ``$TDABENCH_DATTRI_PYTHON``
or ``.peer-venvs/dattri/bin/python`` if they import dattri, else the dattri side is skipped
with a note. Nothing is downloaded or installed here (the GPU machine has no network: carry a
dattri 0.3.0 wheel). ``--small`` shrinks every problem to CPU size; ``--dry-run`` additionally
runs our side only, in-process, on tiny synthetic data (for the test of the plumbing).

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/gpu_compare``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch
import torch.nn.functional as F
from torch import Tensor, nn

THIS = Path(__file__).resolve()
DATTRI_RUNNER = common.BENCH_DIR / "peers" / "dattri_attribute.py"
OURS_RUNNER = common.BENCH_DIR / "attribution_timing.py"
MLP_METHODS = [
    "if_explicit",
    "if_cg",
    "if_lissa",
    "if_arnoldi",
    "tracin",
    "grad_dot",
    "grad_cos",
    "rps",
    "trak_1",
    "trak_10",
]
# --small (CPU): the MLP rows where dattri finishes in seconds on one core (its IF rows take minutes
# there, its CG/LiSSA exhaust 24 GiB); the full list stays available with --mlp-methods
SMALL_MLP_METHODS = ["grad_dot", "grad_cos", "trak_1"]
RESNET_METHODS = ["trak_1", "trak_10", "tracin", "grad_dot", "if_explicit", "ekfac", "logra"]
OPTIONAL_CLASSES = {
    "ekfac": ("IFAttributorEKFAC", "IFAttributorEKFAC"),
    "logra": ("LoGraAttributor", "LoGraAttributor"),
}
RETRAIN_ROWS = ["lr", "mlp", "resnet9"]
RESNET_LAST = ["fc.weight", "fc.bias"]

# problem sizes: full (GPU), --small (CPU dry run of the harness), --dry-run (plumbing test)
SIZES = {
    "full": {
        "mlp_n_test": None,
        "rn_train": 5000,
        "rn_test": 500,
        "rn_widths": (64, 128, 256, 512),
        "rn_proj": 2048,
        "rn_batch": 500,
        "rn_ckpts": 10,
        "rt_models": {"lr": (4, 256), "mlp": (4, 64), "resnet9": (2, 16)},
        "rt_epochs": {"lr": 2, "mlp": 2, "resnet9": 1},
        "rt_resnet_n": 5000,
    },
    "small": {
        "mlp_n_test": 50,
        "rn_train": 256,
        "rn_test": 32,
        "rn_widths": (8, 16, 32, 64),
        "rn_proj": 256,
        "rn_batch": 64,
        "rn_ckpts": 3,
        "rt_models": {"lr": (2, 32), "mlp": (2, 16), "resnet9": (2, 4)},
        "rt_epochs": {"lr": 1, "mlp": 1, "resnet9": 1},
        "rt_resnet_n": 256,
    },
    "dry": {
        "mlp_n_test": 8,
        "rn_train": 24,
        "rn_test": 6,
        "rn_widths": (4, 4, 8, 8),
        "rn_proj": 8,
        "rn_batch": 12,
        "rn_ckpts": 2,
        "rt_models": {"lr": (1, 3), "mlp": (1, 3), "resnet9": (1, 2)},
        "rt_epochs": {"lr": 1, "mlp": 1, "resnet9": 1},
        "rt_resnet_n": 24,
    },
}


def log(msg: str) -> None:
    print(f"[gpu_compare] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the shared ResNet-9
class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(h + self.skip(x))


class ResNet9(nn.Module):
    """tdabench.benchmark.models.ResNet9 without dropout, in plain torch (importable by both sides)."""

    def __init__(
        self, widths: tuple[int, ...] = (64, 128, 256, 512), num_classes: int = 10
    ) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.stem = nn.Sequential(
            nn.Conv2d(3, w0, 3, padding=1, bias=False), nn.BatchNorm2d(w0), nn.ReLU()
        )
        self.stage1, self.stage2, self.stage3 = (
            _Block(w0, w1, 1),
            _Block(w1, w2, 2),
            _Block(w2, w3, 2),
        )
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # one unbatched sample (dattri's vmap over samples)
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return self.fc(self.stage3(self.stage2(self.stage1(self.stem(x)))).mean(dim=(-2, -1)))


def _rn_funcs(model: nn.Module) -> tuple[Any, Any, Any]:
    """(loss, margin, correct-probability) ``f(params, (x, y))`` for the ResNet rows (batch means)."""

    def logits(params: Any, x: Tensor) -> Tensor:
        out = torch.func.functional_call(model, dict(params), (x,))
        return out.unsqueeze(0) if out.dim() == 1 else out

    def loss(params: Any, data: Any) -> Tensor:
        return F.cross_entropy(logits(params, data[0]), data[1].reshape(-1).long())

    def margin(params: Any, data: Any) -> Tensor:
        logp = -F.cross_entropy(
            logits(params, data[0]), data[1].reshape(-1).long(), reduction="none"
        )
        return (logp - torch.log1p(-torch.exp(logp).clamp(max=1 - 1e-7))).mean()

    def prob(params: Any, data: Any) -> Tensor:
        return torch.exp(
            -F.cross_entropy(logits(params, data[0]), data[1].reshape(-1).long(), reduction="none")
        ).mean()

    return loss, margin, prob


# --------------------------------------------------------------------------- job runners (child side)
def _sync_reset(dev: str) -> None:
    common.sync_device(dev)
    if torch.device(dev).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _attributor(
    side: str, kind: str, job: dict[str, Any], model: nn.Module, ckpts: list[dict[str, Tensor]]
) -> Any:
    """The attributor of one ResNet row, built with the same arguments on both sides."""
    dev = job["device"]
    loss, margin, prob = _rn_funcs(model)
    proj = {"proj_dim": job["proj_dim"], "proj_max_batch_size": 32, "proj_seed": 0, "device": dev}
    if side == "dattri":
        import dattri.algorithm as alg
        from dattri.task import AttributionTask
    else:
        import attribution_timing

        import tdabench.algorithm as alg
        from tdabench.task import AttributionTask

        proj = attribution_timing.projector_kwargs(proj)
    ck = ckpts[0] if len(ckpts) == 1 else ckpts
    if kind == "trak":
        return alg.TRAKAttributor(
            task=AttributionTask(loss_func=margin, model=model, checkpoints=ck),
            correct_probability_func=prob,
            projector_kwargs=proj,
            layer_name=None,
            device=dev,
            regularization=0.0,
        )
    task = AttributionTask(loss_func=loss, model=model, checkpoints=ck)
    if kind in ("tracin", "grad_dot"):
        return alg.TracInAttributor(
            task=task,
            weight_list=torch.full((len(ckpts),), 0.01),
            normalized_grad=False,
            projector_kwargs=proj,
            layer_name=None,
            device=dev,
        )
    if kind == "if_explicit":
        return alg.IFAttributorExplicit(
            task=task, layer_name=RESNET_LAST, device=dev, regularization=1e-3
        )
    if kind == "ekfac":
        return getattr(alg, OPTIONAL_CLASSES[kind][side == "ours"])(
            task=task, module_name="fc", device=dev, damping=1e-3
        )
    if kind == "logra":
        return getattr(alg, OPTIONAL_CLASSES[kind][side == "ours"])(
            task=task,
            layer_names=["fc"],
            hessian="eFIM",
            damping=1e-3,
            device=dev,
            proj_dim=job["proj_dim"],
        )
    raise ValueError(f"unknown ResNet row kind {kind!r}")


def _resnet_job(job: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
    from torch.utils.data import DataLoader, TensorDataset

    side, kind, dev = job["side"], job["kind"], job["device"]
    data = common.read_safetensors(job["data_path"])[0]
    model = ResNet9(tuple(job["widths"])).eval()
    ckpts = [common.read_safetensors(p)[0] for p in job["checkpoint_paths"]]
    train = TensorDataset(data["x_train"], data["y_train"])
    train_dl = DataLoader(train, batch_size=job["batch"])
    test_dl = DataLoader(TensorDataset(data["x_test"], data["y_test"]), batch_size=job["batch"])
    att = _attributor(side, kind, job, model, ckpts)
    common.warm_torch()
    _sync_reset(dev)
    t0 = time.perf_counter()
    if kind in ("trak", "if_explicit", "ekfac", "logra") or getattr(att, "requires_cache", False):
        # one cache batch for IF explicit (dattri sums per-batch inverses of a multi-batch cache loader)
        att.cache(DataLoader(train, batch_size=len(train)) if kind == "if_explicit" else train_dl)
    common.sync_device(dev)
    t1 = time.perf_counter()
    if side == "dattri" and kind == "trak":
        scores = att.attribute(
            test_dl
        )  # dattri's TRAK: test loader first, train side from the cache
    else:
        scores = att.attribute(train_dl, test_dl)
    common.sync_device(dev)
    t2 = time.perf_counter()
    return scores, {"time_cache": t1 - t0, "time_attribute": t2 - t1, "time_total": t2 - t0}


def _retrain_problem(job: dict[str, Any]) -> tuple[Tensor, Tensor, Any, dict[str, Any]]:
    """``(x, y, build_model, recipe)`` of one retraining row."""
    name, epochs = job["model"], job["epochs"]
    if name == "resnet9":
        from tdabench.benchmark.models import ResNet9 as OurResNet9

        d = common.read_safetensors(job["data_path"])[0]
        n = job["n_train"]
        widths = tuple(job["widths"])
        return (
            d["x_train"][:n],
            d["y_train"][:n],
            lambda: OurResNet9(num_classes=10, widths=widths, dropout=0.0),
            dict(optimizer="sgd", lr=0.01, momentum=0.9, epochs=epochs, batch_size=64),
        )
    d = common.load_data(Path(job["cache_dir"]))
    x, y = d["x_train"].reshape(len(d["y_train"]), -1), d["y_train"]
    if name == "lr":
        return (
            x,
            y,
            lambda: nn.Linear(784, 10),
            dict(optimizer="sgd", lr=0.01, epochs=epochs, batch_size=32),
        )
    return (
        x,
        y,
        lambda: nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)),
        dict(optimizer="sgd", lr=0.01, momentum=0.9, epochs=epochs, batch_size=64),
    )


def _retrain_job(job: dict[str, Any]) -> dict[str, Any]:
    """Batched vs sequential models/s on the job's device (same masks, seeds and stream)."""
    from tdabench.groundtruth.trainer import BatchedTrainer, SequentialTrainer

    dev = job["device"]
    x, y, build, recipe = _retrain_problem(job)
    n = len(y)
    k_seq, k_bat = job["models"]
    g = torch.Generator().manual_seed(1)
    masks = torch.stack([torch.randperm(n, generator=g) < n // 2 for _ in range(k_bat)])
    out: dict[str, Any] = {"n_train": n, "recipe": recipe}
    first = {}
    for cls, k in ((SequentialTrainer, k_seq), (BatchedTrainer, k_bat)):
        warm = cls(
            build,
            (x[:64], y[:64]),
            (x[:8], y[:8]),
            dict(recipe, epochs=None, max_iters=2),
            device=dev,
        )
        warm.train(
            torch.ones(min(k, 2), min(64, n), dtype=torch.bool), list(range(min(k, 2)))
        )  # one-time costs
        tr = cls(build, (x, y), (x[:64], y[:64]), recipe, stream_seed=0, device=dev)
        _sync_reset(dev)
        t0 = time.perf_counter()
        state = tr.train(masks[:k], list(range(k)))
        common.sync_device(dev)
        wall = time.perf_counter() - t0
        first[cls.name] = {
            key: v[0].double().cpu() for key, v in state.items() if v.is_floating_point()
        }
        peak = (
            torch.cuda.max_memory_allocated() / 2**20 if torch.device(dev).type == "cuda" else None
        )
        out[cls.name] = {"models": k, "wall_s": wall, "models_per_s": k / wall, "peak_gpu_mb": peak}
        if cls is BatchedTrainer:
            out[cls.name].update(
                chunk=tr.models_per_chunk(k, tr.stream_batch_size(masks[:k])),
                fast_path=tr.fast_path,
            )
    a, b = first["sequential"], first["batched"]
    out["first_model_rel_diff"] = max(
        float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-30)) for k in a
    )
    out["speedup"] = out["batched"]["models_per_s"] / out["sequential"]["models_per_s"]
    return out


def run_job_file(path: str) -> int:
    """Child entry point: run one ResNet or retraining job, write its result (never raises)."""
    job = json.loads(Path(path).read_text())
    common.one_thread()
    result: dict[str, Any] = {
        "side": job["side"],
        "method": job["method"],
        "model": job["model"],
        "ok": False,
        "torch": torch.__version__,
    }
    scores = None
    try:
        if job["section"] == "resnet":
            scores, times = _resnet_job(job)
            result.update(times)
        else:
            result.update(_retrain_job(job))
        result["ok"] = True
    except Exception as exc:  # reported in the table
        result["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        result["traceback"] = traceback.format_exc()[-3000:]
    common.finish_job(job, result, scores)
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------- parent side
def resolve_dattri(choice: str | None) -> tuple[str | None, str]:
    """``(python, note)`` of the dattri side; ``None`` when it is skipped (the note says why)."""

    def imports(py: str) -> bool:
        try:
            r = subprocess.run(
                [py, "-c", "import dattri, torch"],
                capture_output=True,
                timeout=300,
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0

    if choice == "none":
        return None, "dattri side not run (--dattri-python none)"
    if choice == "same":
        return (
            (sys.executable, "dattri from this python")
            if imports(sys.executable)
            else (
                None,
                f"dattri side skipped: {sys.executable} cannot import dattri (install the dattri 0.3.0 wheel)",
            )
        )
    cands = (
        [choice]
        if choice
        else [
            os.environ.get("TDABENCH_DATTRI_PYTHON"),
            str(common.ROOT / ".peer-venvs" / "dattri" / "bin" / "python"),
        ]
    )
    for py in (c for c in cands if c):
        if Path(py).is_file() and imports(py):
            return py, f"dattri from {py}"
    return None, (
        f"dattri side skipped: no python that imports dattri among {[c for c in cands if c]} "
        "(pass --dattri-python PATH or same; on a machine without network carry a dattri 0.3.0 wheel)"
    )


class Runner:
    """Runs jobs in fresh processes (or inline for --dry-run) under a per-row timeout and a total budget."""

    def __init__(self, device: str, row_timeout: float, budget: float, inline: bool) -> None:
        self.device, self.row_timeout, self.budget, self.inline = (
            device,
            row_timeout,
            budget,
            inline,
        )
        self.t0 = time.perf_counter()
        self.section_end = self.t0 + budget

    def section(self, share: float) -> None:
        """Start a section that may use ``share`` of the whole budget plus what earlier sections
        left (a slow section never starves the ones after it)."""
        now = time.perf_counter()
        self.section_end = min(
            self.t0 + self.budget, now + share * self.budget + max(0.0, self.section_end - now)
        )

    def left(self) -> float:
        return self.section_end - time.perf_counter()

    def run(self, cmd: list[str], job: dict[str, Any]) -> dict[str, Any]:
        if self.left() < min(
            30.0, self.row_timeout / 2
        ):  # too little left for a fair run of this row
            return {
                "ok": False,
                "error": f"skipped: this section's share of the --budget of {self.budget:.0f} s was spent",
            }
        if self.inline:
            Path(job["job_path"]).write_text(json.dumps(job, indent=1))
            if cmd[-1] == "--job" and cmd[-2] == str(OURS_RUNNER):
                import attribution_timing

                attribution_timing.run_job_file(job["job_path"])
            else:
                run_job_file(job["job_path"])
            return json.loads(Path(job["result_path"]).read_text())
        return common.run_job(
            cmd, job, min(self.row_timeout, self.left()), None if "cuda" in self.device else 16.0
        )


def _job_paths(jobs_dir: Path, stem: str) -> dict[str, str]:
    return {
        "scores_path": str(jobs_dir / f"{stem}.scores.safetensors"),
        "result_path": str(jobs_dir / f"{stem}.result.json"),
        "job_path": str(jobs_dir / f"{stem}.job.json"),
        "log_path": str(jobs_dir / f"{stem}.log"),
    }


def _memory(r: dict[str, Any], device: str) -> float | None:
    """Peak GPU memory (MB) on CUDA, else the process's peak RSS (MB)."""
    return r.get("peak_gpu_mb") if "cuda" in device else r.get("ru_maxrss_mb")


def _pair_row(
    section: str,
    model: str,
    method: str,
    res: dict[str, dict[str, Any]],
    device: str,
    lds: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    row: dict[str, Any] = {"section": section, "model": model, "method": method}
    for side, r in res.items():
        row[side] = {
            "ok": bool(r.get("ok")),
            "time_s": r.get("time_total"),
            "memory_mb": _memory(r, device),
            "error": r.get("error"),
            "lds": (lds or {}).get(side),
        }
    o, d = row.get("ours", {}), row.get("dattri", {})
    if o.get("ok") and d.get("ok") and d.get("time_s"):
        row["time_ratio"] = o["time_s"] / d["time_s"]
        if o.get("memory_mb") and d.get("memory_mb"):
            row["memory_ratio"] = o["memory_mb"] / d["memory_mb"]
    return row


def _lds_of(
    r: dict[str, Any], gt: tuple[Tensor, Tensor] | None, n_test: int | None
) -> float | None:
    if gt is None or not r.get("ok") or not r.get("scores_path"):
        return None
    values, indices = gt
    scores = common.read_safetensors(r["scores_path"])[0]["scores"]
    return common.lds(scores, values[:, : scores.shape[1]], indices)[0]


def _synthetic_mnist(cache_dir: Path) -> dict[str, Any]:
    """A tiny MNIST-shaped cache (data + random MLP checkpoints) for --dry-run: plumbing only."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    n, nt = 40, 8
    common.write_safetensors(
        {
            "x_train": torch.rand(n, 784, generator=g),
            "y_train": torch.randint(0, 10, (n,), generator=g),
            "x_test": torch.rand(nt, 784, generator=g),
            "y_test": torch.randint(0, 10, (nt,), generator=g),
        },
        cache_dir / "mnist5000.safetensors",
        {"source": "synthetic (gpu_compare --dry-run)"},
    )
    paths = []
    for k in range(2):
        torch.manual_seed(k)
        p = cache_dir / f"mlp_random{k}.safetensors"
        common.write_safetensors(common.build_model("mlp").state_dict(), p)
        paths.append(str(p))
    return {"final": paths[0], "epochs": paths, "halves": paths, "epoch_weights": [0.01, 0.01]}


def mlp_section(
    args: argparse.Namespace,
    size: dict[str, Any],
    runner: Runner,
    dattri_py: str | None,
    jobs_dir: Path,
) -> list[dict[str, Any]]:
    """The MNIST MLP rows (both sides through the compare.py job runners)."""
    if args.dry_run:
        cache_dir = jobs_dir / "cache"
        paths, gt = _synthetic_mnist(cache_dir), None
    else:
        cache_dir = common.CACHE_DIR
        paths = common.prepare_checkpoints("mlp")
        gt_path = cache_dir / "gt_mlp.safetensors"
        gt = common.load_ground_truth(gt_path) if gt_path.is_file() else None
    cmds = {"ours": [sys.executable, str(OURS_RUNNER), "--job"]}
    if dattri_py:
        cmds["dattri"] = [dattri_py, str(DATTRI_RUNNER)]
    rows = []
    for method in args.mlp_methods:
        res = {}
        for side, cmd in cmds.items():
            job = common.make_job(
                side,
                method,
                "mlp",
                paths,
                jobs_dir,
                size["mlp_n_test"],
                cache_dir=cache_dir,
                device=runner.device,
            )
            if (
                args.dry_run and "projector_kwargs" in job["hparams"]
            ):  # 40 synthetic samples: project narrower
                job["hparams"] = {
                    **job["hparams"],
                    "projector_kwargs": {**job["hparams"]["projector_kwargs"], "proj_dim": 16},
                }
            res[side] = runner.run(cmd, job)
        lds = {side: _lds_of(r, gt, size["mlp_n_test"]) for side, r in res.items()}
        rows.append(_pair_row("mnist_mlp", "mlp", method, res, runner.device, lds))
        log(f"mlp {method}: " + ", ".join(f"{s} {_brief(r)}" for s, r in res.items()))
    return rows


def _brief(r: dict[str, Any]) -> str:
    if r.get("ok"):
        return f"{r.get('time_total', float('nan')):.2f} s"
    return f"failed ({str(r.get('error'))[:100]})"


def _resnet_inputs(size: dict[str, Any], work: Path) -> tuple[str, list[str]]:
    """CIFAR-shaped random data and randomly initialised ResNet-9 checkpoints, written once."""
    work.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    n, nt = size["rn_train"], size["rn_test"]
    data_path = work / f"cifar_shaped_{n}x{nt}.safetensors"
    if not data_path.is_file():
        common.write_safetensors(
            {
                "x_train": torch.randn(n, 3, 32, 32, generator=g),
                "y_train": torch.randint(0, 10, (n,), generator=g),
                "x_test": torch.randn(nt, 3, 32, 32, generator=g),
                "y_test": torch.randint(0, 10, (nt,), generator=g),
            },
            data_path,
        )
    ckpts = []
    for k in range(size["rn_ckpts"]):
        p = work / f"resnet9_{'-'.join(map(str, size['rn_widths']))}_seed{k}.safetensors"
        if not p.is_file():
            torch.manual_seed(k)
            common.write_safetensors(ResNet9(size["rn_widths"]).eval().state_dict(), p)
        ckpts.append(str(p))
    return str(data_path), ckpts


def _has_class(kind: str, dattri_py: str | None) -> tuple[bool, bool]:
    """Whether ours / dattri have the optional class of ``kind`` (EK-FAC, LoGra)."""
    import tdabench.algorithm as alg

    ours = hasattr(alg, OPTIONAL_CLASSES[kind][1])
    theirs = False
    if dattri_py:
        r = subprocess.run(
            [
                dattri_py,
                "-c",
                f"import dattri.algorithm as a; assert hasattr(a, '{OPTIONAL_CLASSES[kind][0]}')",
            ],
            capture_output=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        theirs = r.returncode == 0
    return ours, theirs


def resnet_section(
    args: argparse.Namespace,
    size: dict[str, Any],
    runner: Runner,
    dattri_py: str | None,
    jobs_dir: Path,
    work: Path,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The ResNet-9 CIFAR-shaped rows (both sides through this file's --job runner)."""
    data_path, ckpts = _resnet_inputs(size, work)
    rows, notes = [], []
    kinds = {
        "trak_1": ("trak", 1),
        "trak_10": ("trak", len(ckpts)),
        "tracin": ("tracin", len(ckpts)),
        "grad_dot": ("grad_dot", 1),
        "if_explicit": ("if_explicit", 1),
        "ekfac": ("ekfac", 1),
        "logra": ("logra", 1),
    }
    for method in args.resnet_methods:
        kind, k = kinds[method]
        sides = {"ours": sys.executable, **({"dattri": dattri_py} if dattri_py else {})}
        if kind in OPTIONAL_CLASSES:
            ours_has, theirs_has = _has_class(kind, dattri_py)
            if not ours_has:
                notes.append(
                    f"ResNet-9 {method}: skipped, tdabench.algorithm has no {OPTIONAL_CLASSES[kind][1]} yet"
                )
                continue
            if not theirs_has:
                sides.pop("dattri", None)
        res = {}
        for side, py in sides.items():
            job = {
                "section": "resnet",
                "side": side,
                "method": method,
                "model": "resnet9",
                "kind": kind,
                "device": runner.device,
                "data_path": data_path,
                "checkpoint_paths": ckpts[:k],
                "widths": list(size["rn_widths"]),
                "proj_dim": size["rn_proj"],
                "batch": size["rn_batch"],
                **_job_paths(jobs_dir, f"{side}_resnet9_{method}"),
            }
            res[side] = runner.run([py, str(THIS), "--job"], job)
        rows.append(_pair_row("cifar_resnet9", "resnet9", method, res, runner.device))
        log(f"resnet9 {method}: " + ", ".join(f"{s} {_brief(r)}" for s, r in res.items()))
    return rows, notes


def retrain_section(
    args: argparse.Namespace, size: dict[str, Any], runner: Runner, jobs_dir: Path, work: Path
) -> list[dict[str, Any]]:
    """Retraining throughput rows (ours: batched vs sequential)."""
    cache_dir = jobs_dir / "cache" if args.dry_run else common.CACHE_DIR
    if args.dry_run and not (cache_dir / "mnist5000.safetensors").is_file():
        _synthetic_mnist(cache_dir)
    n = size["rt_resnet_n"]
    data_path = str(work / f"retrain_cifar_shaped_{n}.safetensors")
    if not Path(data_path).is_file():
        g = torch.Generator().manual_seed(1)
        common.write_safetensors(
            {
                "x_train": torch.randn(n, 3, 32, 32, generator=g),
                "y_train": torch.randint(0, 10, (n,), generator=g),
            },
            data_path,
        )
    rows = []
    for name in args.retrain_rows:
        job = {
            "section": "retrain",
            "side": "ours",
            "method": "retrain",
            "model": name,
            "device": runner.device,
            "epochs": size["rt_epochs"][name],
            "models": list(size["rt_models"][name]),
            "cache_dir": str(cache_dir),
            "data_path": data_path,
            "n_train": n,
            "widths": list(size["rn_widths"]),
            **_job_paths(jobs_dir, f"ours_retrain_{name}"),
        }
        r = runner.run([sys.executable, str(THIS), "--job"], job)
        rows.append(
            {
                "section": "retrain",
                "model": name,
                **{
                    k: r.get(k)
                    for k in (
                        "ok",
                        "error",
                        "sequential",
                        "batched",
                        "speedup",
                        "first_model_rel_diff",
                        "n_train",
                    )
                },
            }
        )
        log(
            f"retrain {name}: "
            + (f"batched/sequential {r['speedup']:.1f}x" if r.get("ok") else _brief(r))
        )
    return rows


# --------------------------------------------------------------------------- report
def _f(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _cell(side: dict[str, Any], key: str, spec: str = ".2f") -> str:
    if not side:
        return "not run"
    if not side.get("ok"):
        return (
            "failed: " + str(side.get("error"))[:60].replace("|", "/") if key == "time_s" else "-"
        )
    return _f(side.get(key), spec)


def render(payload: dict[str, Any]) -> str:
    dev, mem = payload["device"], "peak GPU MB" if "cuda" in payload["device"] else "peak RSS MB"
    out = [
        f"# GPU side-by-side: tdabench vs dattri 0.3.0 on `{dev}` ({payload['size']} size)",
        "",
        f"{payload['dattri_note']}; torch {payload['torch']}; {payload['gpu_name'] or 'no GPU'}; "
        f"whole run {payload['seconds']:.0f} s (budget {payload['budget_s']:.0f} s).",
        "",
    ]
    head = (
        f"| model | method | ours s | dattri s | ours/dattri time | ours {mem} | dattri {mem} | "
        "ours/dattri memory | LDS ours | LDS dattri |"
    )
    out += [head, "|" + "---|" * 10]
    for r in payload["rows"]:
        if r["section"] == "retrain":
            continue
        o, d = r.get("ours", {}), r.get("dattri", {})
        out.append(
            f"| {r['model']} | {r['method']} | {_cell(o, 'time_s')} | {_cell(d, 'time_s')} | "
            f"{_f(r.get('time_ratio'))} | {_cell(o, 'memory_mb', '.0f')} | {_cell(d, 'memory_mb', '.0f')} | "
            f"{_f(r.get('memory_ratio'))} | {_cell(o, 'lds', '.3f')} | {_cell(d, 'lds', '.3f')} |"
        )
    out += [
        "",
        "Retraining throughput (ours; same masks, seeds and minibatch stream for both trainers):",
        "",
        "| model | sequential models/s | batched models/s | batched / sequential | models per chunk | "
        "peak GPU MB seq / batched | first model rel. diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        if r["section"] != "retrain":
            continue
        if not r.get("ok"):
            out.append(f"| {r['model']} | failed: {str(r.get('error'))[:80]} | | | | | |")
            continue
        s, b = r["sequential"], r["batched"]
        out.append(
            f"| {r['model']} | {s['models_per_s']:.2f} | {b['models_per_s']:.2f} | {r['speedup']:.1f}x | "
            f"{b.get('chunk')} | {_f(s.get('peak_gpu_mb'), '.0f')} / {_f(b.get('peak_gpu_mb'), '.0f')} | "
            f"{r['first_model_rel_diff']:.1e} |"
        )
    out += ["", *[f"- {n}" for n in payload["notes"]]]
    return "\n".join(out) + "\n"


def goals(rows: list[dict[str, Any]], size: str) -> list[str]:
    """The issue's goals, checked on the rows measured (a goal without its rows says so)."""
    notes = []
    paired = [r for r in rows if r.get("time_ratio") is not None]
    if paired:
        worst = max(paired, key=lambda r: r["time_ratio"])
        notes.append(
            f"goal time <= 0.5x dattri: {sum(r['time_ratio'] <= 0.5 for r in paired)}/{len(paired)} rows "
            f"(worst {worst['model']} {worst['method']} {worst['time_ratio']:.2f}x)"
        )
    mem = [r for r in rows if r.get("memory_ratio") is not None]
    if mem:
        notes.append(
            f"goal memory <= 0.5x dattri: {sum(r['memory_ratio'] <= 0.5 for r in mem)}/{len(mem)} rows"
        )
    lds = [
        r
        for r in rows
        if r.get("ours", {}).get("lds") is not None and r.get("dattri", {}).get("lds") is not None
    ]
    if lds:
        notes.append(
            f"goal LDS >= dattri - 0.01: {sum(r['ours']['lds'] >= r['dattri']['lds'] - 0.01 for r in lds)}"
            f"/{len(lds)} rows"
        )
    rt = next(
        (r for r in rows if r["section"] == "retrain" and r["model"] == "resnet9" and r.get("ok")),
        None,
    )
    if rt:
        notes.append(f"goal ResNet-9 retraining >= 4x sequential: {rt['speedup']:.1f}x")
    trak = next(
        (
            r
            for r in rows
            if r["model"] == "resnet9"
            and r.get("method") == "trak_1"
            and r.get("ours", {}).get("ok")
        ),
        None,
    )
    if trak and size == "full":
        notes.append(f"goal ResNet-9 5,000 x 500 TRAK-1 <= 2 s: {trak['ours']['time_s']:.2f} s")
    if size != "full":
        notes.append(
            "problem sizes shrunk (--small / --dry-run): times and ratios are not the issue's goals"
        )
    return notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    common.add_device_arg(p, default="cuda")
    p.add_argument(
        "--small", action="store_true", help="CPU-sized problems (a dry run of the whole harness)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="tiny synthetic problems, our side only, in-process"
    )
    p.add_argument(
        "--dattri-python", default=None, help="python that imports dattri 0.3.0, 'same', or 'none'"
    )
    p.add_argument(
        "--sections",
        nargs="+",
        default=["mlp", "resnet", "retrain"],
        choices=["mlp", "resnet", "retrain"],
    )
    p.add_argument(
        "--mlp-methods",
        nargs="+",
        default=None,
        choices=MLP_METHODS,
        help="default: all ten (--small: grad_dot grad_cos trak_1)",
    )
    p.add_argument("--resnet-methods", nargs="+", default=RESNET_METHODS, choices=RESNET_METHODS)
    p.add_argument("--retrain-rows", nargs="+", default=RETRAIN_ROWS, choices=RETRAIN_ROWS)
    p.add_argument("--row-timeout", type=float, default=75.0, help="seconds per row and side")
    p.add_argument(
        "--budget",
        type=float,
        default=340.0,
        help="seconds for the whole run (issue: <= 6 minutes)",
    )
    p.add_argument(
        "--out", default=str(common.RESULTS_DIR / "gpu_compare"), help="output prefix (.json, .md)"
    )
    args = p.parse_args(argv)
    if args.job:
        return run_job_file(args.job)
    if args.mlp_methods is None:
        args.mlp_methods = SMALL_MLP_METHODS if (args.small or args.dry_run) else MLP_METHODS
    t_start = time.perf_counter()
    size_name = "dry" if args.dry_run else "small" if args.small else "full"
    size = SIZES[size_name]
    device = common.resolve_device(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        jobs_dir = out.parent / f"{out.name}_jobs"
        jobs_dir.mkdir(parents=True, exist_ok=True)
        work, (dattri_py, dattri_note) = jobs_dir / "work", (None, "dry run: dattri side not run")
    else:
        jobs_dir, work = common.new_jobs_dir("gpu_compare"), common.CACHE_DIR / "gpu_compare"
        dattri_py, dattri_note = resolve_dattri(args.dattri_python)
    log(f"device {device}, size {size_name}; {dattri_note}")
    runner = Runner(device, args.row_timeout, args.budget, inline=args.dry_run)
    rows: list[dict[str, Any]] = []
    notes = [dattri_note] if dattri_py is None else []
    weights = {
        "mlp": 0.4,
        "resnet": 0.4,
        "retrain": 0.2,
    }  # of --budget, plus what earlier sections left
    shares = {k: w / sum(weights[x] for x in args.sections) for k, w in weights.items()}
    runner.section_end = runner.t0  # nothing left over before the first section
    if "mlp" in args.sections:
        runner.section(shares["mlp"])
        rows += mlp_section(args, size, runner, dattri_py, jobs_dir)
    if "resnet" in args.sections:
        runner.section(shares["resnet"])
        r, n = resnet_section(args, size, runner, dattri_py, jobs_dir, work)
        rows, notes = rows + r, notes + n
    if "retrain" in args.sections:
        runner.section(shares["retrain"])
        rows += retrain_section(args, size, runner, jobs_dir, work)
    payload = {
        "device": device,
        "size": size_name,
        "sizes": {k: v for k, v in size.items()},
        "rows": rows,
        "dattri_python": dattri_py,
        "dattri_note": dattri_note,
        "torch": torch.__version__,
        "gpu_name": torch.cuda.get_device_name() if "cuda" in device else None,
        "budget_s": args.budget,
        "row_timeout_s": args.row_timeout,
        "notes": notes + goals(rows, size_name),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "seconds": time.perf_counter() - t_start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    text = render(payload)
    print(text)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    out.with_suffix(".md").write_text(text)
    log(f"wrote {out}.json / .md in {payload['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
