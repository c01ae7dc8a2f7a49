"""Stage bodies: thin calls into the tdabench library, one function per ``tdabench <stage>``.

Each function receives the stage's spec (see :func:`tdabench.pipeline.config.stage_spec`) and
explicit input/output paths, calls the library, and writes its outputs atomically. Everything that
is not a library call (atomic I/O, the shard launcher, bootstrap CIs, the report) is generic code
here or in :mod:`tdabench.pipeline.io` / :mod:`tdabench.pipeline.launcher`.

The library APIs used are those of CONTRACTS.md (``tdabench.benchmark``, ``tdabench.groundtruth``,
``tdabench.algorithm``, ``tdabench.metric``); the call sites marked ``# LIBRARY`` are the wiring
points. :mod:`tdabench.pipeline.toy` provides stand-ins with the same signatures, selected with
``TDABENCH_STAGES=tdabench.pipeline.toy``, used by the pipeline's own tests.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdabench.pipeline.io import (
    read_json,
    read_parquet_meta,
    read_scores,
    write_json,
    write_scores,
    write_self_scores,
    write_table,
)
from tdabench.pipeline.launcher import LauncherSettings, launch_shards

__all__ = [
    "attribute",
    "bootstrap_ci",
    "evaluate",
    "groundtruth",
    "merge",
    "num_shards",
    "prepare",
    "provenance",
    "report",
    "run_shards",
    "train",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# generic helpers (no library calls)


def provenance() -> dict[str, Any]:
    """tdabench version, code revision and creation time (goes into every output's metadata)."""
    import tdabench

    rev = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or "unknown"
        )
    return {
        "tdabench_version": tdabench.__version__,
        "code_revision": rev,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def num_shards(count: int, shard_size: int) -> int:
    """Shards covering ``count`` removals/subsets: shard ``i`` holds ``[i*size, (i+1)*size)``."""
    return math.ceil(count / shard_size)


def bootstrap_ci(
    values: Any, num_resamples: int, confidence: float, seed: int
) -> tuple[float, float, float]:
    """Mean of ``values`` (one per test point; NaNs dropped) and its percentile bootstrap CI.

    Returns:
        ``(mean, low, high)``; low = high = mean when ``num_resamples`` is 0 or one value is left.
    """
    import numpy as np

    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if num_resamples == 0 or v.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(num_resamples, v.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return mean, float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def run_shards(
    fn: Any,
    count: int,
    shard_size: int,
    is_complete: Any,
    store_dir: str,
    out: str,
    launcher: Mapping[str, Any] | LauncherSettings | None,
    key: str,
    name: str,
) -> dict[str, Any]:
    """Launch every incomplete shard of a store, then write ``out`` (complete-<n>.json).

    ``out`` is written only when every shard succeeded (the launcher raises otherwise), so
    Snakemake sees the ground truth as done exactly when it is.
    """
    settings = (
        launcher if isinstance(launcher, LauncherSettings) else LauncherSettings.from_dict(launcher)
    )
    ids = list(range(num_shards(count, shard_size)))
    rep = launch_shards(fn, ids, is_complete, settings=settings, name=name)
    summary = {
        "key": key,
        "count": count,
        "shard_size": shard_size,
        "num_shards": len(ids),
        "store": str(store_dir),
        "skipped": rep.skipped,
        "ran": rep.completed,
        "attempts": {str(k): v for k, v in rep.attempts.items()},
        "job_ids": rep.job_ids,
        "launcher_kind": settings.kind,
        "seconds": round(rep.seconds, 3),
        **provenance(),
    }
    write_json(out, summary)
    return summary


def _threads() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _device(requested: str | None) -> str:
    import torch

    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


# ----------------------------------------------------------------------------------------------
# library-backed stages


def _setting(spec: Mapping[str, Any]) -> Any:
    from tdabench.benchmark import get_setting  # LIBRARY

    core = spec.get("prepare", spec)  # train/attribute specs nest the prepare spec
    recipe = spec.get("recipe") or {}
    return get_setting(core["setting"], **core["overrides"], **recipe)


def _load(spec: Mapping[str, Any]) -> tuple[Any, Any]:
    core = spec.get("prepare", spec)
    setting = _setting(spec)
    data = setting.load(data_root=core["data_root"], seed=core["data"]["seed"])  # LIBRARY
    return setting, data


def prepare(spec: Mapping[str, Any], out_dir: str) -> None:
    """Load the split, record its identity, and flip labels for mislabel detection.

    Writes ``<out_dir>/noisy.parquet`` (train_index, label, noisy_label, flipped) and
    ``<out_dir>/meta.json`` (the data identity from ``BenchmarkData.meta`` + the spec).
    """
    import numpy as np
    import pyarrow as pa

    from tdabench.benchmark import flip_labels  # LIBRARY

    _threads()
    setting, data = _load(spec)
    labels = data.train[1]
    mask = np.zeros(len(labels), dtype=bool)
    if setting.kind == "classification":
        noisy, flipped = flip_labels(  # LIBRARY
            labels, spec["auc"]["noise_fraction"], setting.num_classes, seed=spec["auc"]["seed"]
        )
        mask[np.asarray(flipped)] = True
        label_col, noisy_col = np.asarray(labels), np.asarray(noisy)
    else:  # sequences have no single label to flip: no mislabel-detection variant (-1 = none)
        label_col = noisy_col = np.full(len(labels), -1)
    table = pa.table(
        {
            "train_index": pa.array(np.arange(len(labels)), pa.int64()),
            "label": pa.array(label_col, pa.int64()),
            "noisy_label": pa.array(noisy_col, pa.int64()),
            "flipped": pa.array(mask),
        }
    )
    meta = {
        "spec": dict(spec),
        "data": data.meta,
        "n_train": len(labels),
        "n_test": len(data.test[1]),
        **provenance(),
    }
    write_table(Path(out_dir) / "noisy.parquet", table, meta)
    write_json(Path(out_dir) / "meta.json", meta)


def _check_data(spec: Mapping[str, Any], data: Any, data_dir: str) -> None:
    """Refuse to continue when the data loaded now differs from what ``prepare`` recorded."""
    from tdabench.errors import DataError

    recorded = read_json(Path(data_dir) / "meta.json")["data"]
    if recorded != data.meta:
        raise DataError(
            f"the data loaded now differs from {data_dir}/meta.json (its identity changed); "
            "delete that directory to re-run prepare, or restore the original data files."
        )


def train(spec: Mapping[str, Any], data_dir: str, out_dir: str, device: str = "auto") -> None:
    """Train the reference models: ``ensemble`` clean models with ``checkpoints`` snapshots each,
    plus the same recipe on the noisy labels (for mislabel detection).

    Writes ``<out_dir>/{clean,noisy}-<k>-ckpt<j>.safetensors`` (j = 0..checkpoints-1, last = final)
    and ``<out_dir>/manifest.json``. Intermediate checkpoints are snapshots of model 0's run taken
    after evenly spaced epochs (the trainer's ``on_epoch`` callback): one training run per model.
    """
    import torch
    from safetensors.torch import save_file

    from tdabench.groundtruth.trainer import make_trainer, unstack  # LIBRARY

    _threads()
    setting, data = _load(spec)
    _check_data(spec, data, data_dir)
    import pyarrow.parquet as pq

    noisy_labels = torch.as_tensor(
        pq.read_table(Path(data_dir) / "noisy.parquet").column("noisy_label").to_numpy().copy()
    )
    # the label-noise variant (mislabel detection) exists for classification only
    variants = ("clean", "noisy") if setting.kind == "classification" else ("clean",)
    t = spec["train"]
    n_train = len(data.train[1])
    masks = torch.ones(t["ensemble"], n_train, dtype=torch.bool)
    seeds = [t["seed"] * 1000 + k for k in range(t["ensemble"])]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[list[str]]] = {"clean": [], "noisy": []}
    # epochs of the shared stream actually run (a recipe with max_iters may span several)
    probe = make_trainer(setting, data, batched=True, device="cpu")
    b_stream = probe.stream_batch_size(masks[:1])
    epochs = math.ceil(probe.num_iters(b_stream) / math.ceil(n_train / b_stream))
    del probe
    stops = sorted(
        {max(1, round(epochs * (j + 1) / t["checkpoints"])) for j in range(t["checkpoints"])}
    )
    want = {stop: j for j, stop in enumerate(stops)}
    for variant in variants:
        d = data
        if variant == "noisy":
            d = type(data)(
                train=(data.train[0], noisy_labels, *data.train[2:]), test=data.test, meta=data.meta
            )
        per_model: list[list[str]] = [[] for _ in range(t["ensemble"])]

        def save(
            k: int,
            j: int,
            state: Mapping[str, Any],
            stop: int,
            variant: str = variant,
            per_model: list[list[str]] = per_model,
        ) -> None:
            name = f"{variant}-{k}-ckpt{j}.safetensors"
            tmp = out / f".{name}.tmp"
            save_file(
                {n: v.contiguous().cpu() for n, v in state.items()},
                str(tmp),
                metadata={"spec": str(dict(spec)), "epochs": str(stop)},
            )
            os.replace(tmp, out / name)
            per_model[k].append(name)

        def snapshot(
            epoch: int, rows: list[int], stacked: dict[str, Any], save: Any = save
        ) -> None:
            # intermediate checkpoints (TracIn) of model 0 only, taken during its one run
            if 0 in rows and epoch in want and want[epoch] < len(stops) - 1:
                save(0, want[epoch], unstack(stacked, rows.index(0)), epoch)

        # the whole ensemble (TRAK) is needed of the clean labels only; models do not depend on
        # which others train with them (shared minibatch stream)
        m = t["ensemble"] if variant == "clean" else 1
        trainer = make_trainer(setting, d, batched=True, device=_device(device))
        stacked = trainer.train(masks[:m], seeds[:m], on_epoch=snapshot)
        if len(per_model[0]) != len(stops) - 1:
            raise RuntimeError(
                f"the trainer reported epochs missing some of the checkpoint epochs {stops[:-1]} "
                "(recipe with max_iters?); set train.checkpoints: 1 or use an epoch-based recipe"
            )
        for k in range(m):
            save(k, len(stops) - 1, unstack(stacked, k), stops[-1])
        files[variant] = [p for p in per_model if p]
    write_json(
        out / "manifest.json",
        {"spec": dict(spec), "epochs": stops, "files": files, "seeds": seeds, **provenance()},
    )


class GroundTruthShard:
    """Picklable shard task: rebuilds setting, data, trainer and store in the worker, runs one shard."""

    def __init__(
        self, spec: Mapping[str, Any], count: int, store_dir: str, device: str = "auto"
    ) -> None:
        self.spec = dict(spec)
        self.count = count
        self.store_dir = store_dir
        self.device = device

    def _objects(self) -> tuple[Any, Any, Any]:
        from tdabench.groundtruth import GroundTruthSpec, open_store
        from tdabench.groundtruth.trainer import make_trainer

        setting, data = _load(self.spec)
        trainer = make_trainer(setting, data, batched=True, device=_device(self.device))
        g = self.spec["spec"]
        common = {
            "seed": self.spec["seed"],
            "shard_size": g["shard_size"],
            "targets": (g["target"],),
            "n_train": trainer.n_train,
        }
        if self.spec["kind"] == "lds":
            gspec = GroundTruthSpec(
                kind="lds",
                num_subsets=self.count,
                subset_ratio=g["subset_ratio"],
                num_runs=g["num_runs_per_subset"],
                **common,
            )
        else:
            gspec = GroundTruthSpec(
                kind="loo", indices=tuple(range(self.count)), num_runs=g["num_runs"], **common
            )
        store = open_store(self.store_dir, gspec, trainer, data={"meta": data.meta})
        return gspec, trainer, store

    def __call__(self, shard_id: int) -> None:
        from tdabench.groundtruth import run_shard

        _threads()
        gspec, trainer, store = self._objects()
        run_shard(store, gspec, trainer, shard_id)  # LIBRARY


def groundtruth(
    spec: Mapping[str, Any],
    count: int,
    store_dir: str,
    out: str,
    launcher: Mapping[str, Any] | None = None,
    device: str = "auto",
) -> None:
    """Retrain every missing shard of the store through the launcher; write ``out`` when all are done."""
    from tdabench.groundtruth import missing_shards

    task = GroundTruthShard(spec, count, store_dir, device)
    gspec, _trainer, store = task._objects()
    missing = set(missing_shards(store, gspec))

    def is_complete(shard_id: int) -> bool:
        if shard_id in missing:  # re-check: another worker may have finished it meanwhile
            return shard_id not in set(missing_shards(store, gspec))
        return True

    run_shards(
        task,
        count,
        spec["spec"]["shard_size"],
        is_complete,
        store_dir,
        out,
        launcher,
        key=getattr(store, "key", ""),
        name=f"gt-{spec['kind']}",
    )


def merge(spec: Mapping[str, Any], complete: str, out: str) -> None:
    """Merge the store's shards into one Parquet file at ``out``."""
    import shutil

    from tdabench.groundtruth import merge as merge_store

    task = GroundTruthShard(spec, read_json(complete)["count"], read_json(complete)["store"])
    gspec, _trainer, store = task._objects()
    merged = Path(merge_store(store, gspec))
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")
    shutil.copyfile(merged, tmp)
    os.replace(tmp, out)


_PROJECTOR_KEYS = ("proj_dim", "proj_type", "seed", "max_chunk_bytes")


def _make_attributor(
    a: Mapping[str, Any], task: Any, model: Any, setting: Any, num_ckpts: int, device: str
) -> Any:
    """Instantiate ``a["method"]`` from its config, supplying what a config cannot hold:
    TracIn's per-checkpoint weights (the recipe's learning rate), TRAK's probability
    function, RPS's final layer (the model's last ``nn.Linear``), and projector settings."""
    from torch import nn

    import tdabench.algorithm as algorithm
    from tdabench.benchmark.targets import make_probability_func
    from tdabench.errors import ConfigError

    name = a["method"]
    cls = getattr(algorithm, name, None)
    if cls is None or not isinstance(cls, type):
        raise ConfigError(f"unknown attributor method {name!r}; use a class of tdabench.algorithm")
    params = dict(a["params"])
    kwargs: dict[str, Any] = {"device": device}
    if name in ("TracInAttributor", "GradDotAttributor", "GradCosAttributor", "TRAKAttributor"):
        proj = {k: params.pop(k) for k in _PROJECTOR_KEYS if k in params}
        if proj:
            kwargs["projector_kwargs"] = proj
    if name == "TracInAttributor":
        params.setdefault("weight_list", [float(setting.recipe["lr"])] * num_ckpts)
    if name == "TRAKAttributor":
        kwargs["correct_probability_func"] = make_probability_func(model, setting.kind)
    if name == "RPSAttributor":
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError(f"RPS needs a final nn.Linear layer; {type(model).__name__} has none")
        kwargs["final_linear_layer_name"] = a["layer_name"] or linears[-1]
    else:
        kwargs["layer_name"] = a["layer_name"]
    return cls(task, **kwargs, **params)


def attribute(
    spec: Mapping[str, Any],
    data_dir: str,
    models_dir: str,
    out: str,
    out_self: str,
    metrics: list[str] | None = None,
    device: str = "auto",
) -> None:
    """Run one attributor: ``(n_train, n_test)`` scores on the clean models, and self-scores on the
    noisy-label model when AUC is evaluated. Timings go into the Parquet metadata."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from tdabench.benchmark.targets import make_loss_func, make_target_func
    from tdabench.task import AttributionTask

    _threads()
    train_spec = spec["train"]
    setting, data = _load(train_spec)
    _check_data(train_spec, data, data_dir)
    a = spec["attributor"]
    manifest = read_json(Path(models_dir) / "manifest.json")
    dev = _device(device)

    def checkpoints(variant: str) -> list[str]:
        per_model = manifest["files"][variant]
        c = a["checkpoints"]
        names = (
            [m[-1] for m in per_model[: c["count"]]]
            if c["kind"] == "final"
            else per_model[0][-c["count"] :]
        )
        return [str(Path(models_dir) / n) for n in names]

    def run(variant: str, labels: Any, self_only: bool) -> tuple[Any, float]:
        model = setting.build_model().eval()  # no dropout noise / batch statistics in gradients
        ckpts = checkpoints(variant)
        task = AttributionTask(
            loss_func=make_loss_func(model, setting.kind),
            model=model,
            checkpoints=ckpts,
            target_func=make_target_func(model, setting.kind, a["target"]),
        )
        attributor = _make_attributor(a, task, model, setting, len(ckpts), dev)
        train_x = (data.train[0], labels)
        n_test = spec["num_test"] or len(data.test[1])
        test_x = (data.test[0][:n_test], data.test[1][:n_test])
        tl = DataLoader(TensorDataset(*train_x), batch_size=a["batch_size"], shuffle=False)
        vl = DataLoader(TensorDataset(*test_x), batch_size=a["batch_size"], shuffle=False)
        t0 = time.perf_counter()
        attributor.cache(tl)
        result = attributor.self_attribute(tl) if self_only else attributor.attribute(tl, vl)
        return result.detach().cpu(), time.perf_counter() - t0

    meta = {"spec": dict(spec), "method": a["method"], **provenance()}
    scores, seconds = run("clean", data.train[1], self_only=False)
    write_scores(out, scores, {**meta, "seconds": seconds})
    if (metrics is None or "auc" in metrics) and setting.kind != "classification":
        if metrics is not None:
            from tdabench.errors import ConfigError

            raise ConfigError(
                f"{setting.name} is a {setting.kind} setting: mislabel detection (auc) needs class "
                "labels; remove auc from the benchmark's metrics"
            )
        metrics = [m for m in ("lds", "loo") if m in (metrics or ())]
    if metrics is None or "auc" in metrics:
        import pyarrow.parquet as pq

        noisy = torch.as_tensor(
            pq.read_table(Path(data_dir) / "noisy.parquet").column("noisy_label").to_numpy().copy()
        )
        self_scores, s_seconds = run("noisy", noisy, self_only=True)
    else:
        self_scores, s_seconds = torch.zeros(0), 0.0
    write_self_scores(out_self, self_scores, {**meta, "seconds": s_seconds})


def evaluate(
    spec: Mapping[str, Any],
    benchmark: str,
    scores: str,
    self_scores: str,
    groundtruth: Mapping[str, str],
    noisy: str,
    out: str,
    curves_out: str,
) -> None:
    """LDS (bootstrap CI + noise ceiling), LOO correlation and mislabel AUC of one method."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from tdabench.groundtruth import load_ground_truth, noise_ceiling
    from tdabench.metric import lds, loo_corr, mislabel_detection_auc

    ev = spec["evaluate"]
    s = torch.as_tensor(read_scores(scores)[0])
    meta = read_parquet_meta(scores)
    result: dict[str, Any] = {
        "benchmark": benchmark,
        "method": spec["method"],
        "attribution_seconds": round(float(meta.get("seconds", float("nan"))), 3),
    }
    curves: dict[str, Any] = {}
    for kind in ("lds", "loo"):
        if kind not in spec["metrics"]:
            continue
        target = spec["targets"][kind]
        values, index = load_ground_truth(groundtruth[kind], target)
        n = min(s.shape[1], values.shape[-1])
        fn = lds if kind == "lds" else loo_corr
        corr, _p = fn(s[:, :n], (values[..., :n], index))
        mean, lo, hi = bootstrap_ci(corr.numpy(), ev["bootstrap"], ev["confidence"], ev["seed"])
        entry = {"value": mean, "ci_low": lo, "ci_high": hi, "n_test": int(n)}
        if kind == "lds":
            from tdabench.errors import ConfigError as _NeedRuns

            try:  # needs num_runs_per_subset >= 2
                nc = noise_ceiling(groundtruth[kind], target)
            except _NeedRuns:
                entry["noise_ceiling"] = None
            else:
                entry["noise_ceiling"] = float(np.nanmean(np.asarray(nc.ceiling)))
                entry["run_corr"] = float(np.nanmean(np.asarray(nc.run_corr)))
                entry["num_runs"] = int(nc.num_runs)
        else:
            k = int(index[0]) if len(index) else 0
            curves["loo_scatter"] = {
                "score": s[index, 0].tolist() if len(index) else [],
                "loo_effect": values[:, 0].tolist(),
                "test_index": 0,
                "first_removed": k,
            }
        result[kind] = entry
    if "auc" in spec["metrics"]:
        self_s = torch.as_tensor(pq.read_table(self_scores).column("score").to_numpy().copy())
        flipped = np.flatnonzero(pq.read_table(noisy).column("flipped").to_numpy())
        # a mislabelled point has unusually high self-influence: rank by self-score
        auc, (fpr, tpr, _thr) = mislabel_detection_auc(self_s, torch.as_tensor(flipped))
        result["auc"] = {"value": float(auc), "num_flipped": len(flipped)}
        curves["roc"] = {"fpr": [float(x) for x in fpr], "tpr": [float(x) for x in tpr]}
    write_json(curves_out, curves)
    write_json(out, result)


# ----------------------------------------------------------------------------------------------
# report (generic: reads the metrics JSON files)


def report(
    spec: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, str]],
    out_md: str,
    out_html: str,
    plots_dir: str,
    summary_csv: str,
) -> None:
    """Table (method x benchmark: LDS +- CI, noise ceiling, LOO, AUC, time) and PNG plots.

    Args:
        metrics: ``{benchmark: {method: path of results/metrics/<b>/<method>.json}}`` (curves are
            read from ``results/<b>/plots/<method>.json``).
    """
    rows = []
    for b, per_method in metrics.items():
        for m, path in per_method.items():
            r = read_json(path)
            # results/metrics/<b>/<m>.json -> results/<b>/plots/<m>.json
            curves_path = Path(path).parents[2] / b / "plots" / f"{m}.json"
            r["_curves"] = read_json(curves_path) if curves_path.exists() else {}
            rows.append(r)

    def fmt(x: Any, nd: int = 3) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"

    header = "| benchmark | method | LDS | 95% CI | noise ceiling | LOO corr | AUC | time (s) |"
    lines = ["# tdabench report", "", header, "|" + "---|" * 8]
    csv = ["benchmark,method,lds,lds_ci_low,lds_ci_high,noise_ceiling,loo,auc,seconds"]
    for r in rows:
        lds_e, loo_e, auc_e = r.get("lds", {}), r.get("loo", {}), r.get("auc", {})
        lines.append(
            f"| {r['benchmark']} | {r['method']} | {fmt(lds_e.get('value'))} | "
            f"[{fmt(lds_e.get('ci_low'))}, {fmt(lds_e.get('ci_high'))}] | "
            f"{fmt(lds_e.get('noise_ceiling'))} | {fmt(loo_e.get('value'))} | "
            f"{fmt(auc_e.get('value'))} | {fmt(r.get('attribution_seconds'), 1)} |"
        )
        csv.append(
            ",".join(
                str(x)
                for x in (
                    r["benchmark"],
                    r["method"],
                    lds_e.get("value", ""),
                    lds_e.get("ci_low", ""),
                    lds_e.get("ci_high", ""),
                    lds_e.get("noise_ceiling", ""),
                    loo_e.get("value", ""),
                    auc_e.get("value", ""),
                    r.get("attribution_seconds", ""),
                )
            )
        )
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    images = _plots(rows, plots) if spec.get("report", {}).get("plots", True) else []
    lines += ["", *[f"![{p.stem}]({os.path.relpath(p, Path(out_md).parent)})" for p in images], ""]
    md = "\n".join(lines)
    with_tmp = Path(out_md)
    from tdabench.pipeline.io import atomic_path

    with atomic_path(with_tmp) as tmp:
        tmp.write_text(md)
    with atomic_path(summary_csv) as tmp:
        tmp.write_text("\n".join(csv) + "\n")
    html = _html(rows, images, Path(out_html).parent, fmt)
    with atomic_path(out_html) as tmp:
        tmp.write_text(html)


def _plots(rows: list[dict[str, Any]], plots: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    benches = sorted({r["benchmark"] for r in rows})
    for metric, title in (("lds", "Linear datamodeling score"), ("loo", "LOO correlation")):
        data = [r for r in rows if metric in r]
        if not data:
            continue
        fig, axes = plt.subplots(1, len(benches), figsize=(4.5 * len(benches), 3.5), squeeze=False)
        for ax, b in zip(axes[0], benches, strict=False):
            rs = [r for r in data if r["benchmark"] == b]
            vals = [r[metric]["value"] for r in rs]
            err = [
                [r[metric]["value"] - r[metric]["ci_low"] for r in rs],
                [r[metric]["ci_high"] - r[metric]["value"] for r in rs],
            ]
            ax.bar([r["method"] for r in rs], vals, yerr=err, capsize=3, color="tab:blue")
            ceil = [
                r[metric].get("noise_ceiling")
                for r in rs
                if r[metric].get("noise_ceiling") is not None
            ]
            if ceil:
                ax.axhline(ceil[0], color="k", ls="--", lw=1, label="noise ceiling")
                ax.legend(fontsize=7)
            ax.set_title(b)
            ax.tick_params(axis="x", rotation=60, labelsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        p = plots / f"{metric}_bars.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)
    roc = [r for r in rows if "roc" in r["_curves"]]
    if roc:
        fig, axes = plt.subplots(1, len(benches), figsize=(4.5 * len(benches), 3.5), squeeze=False)
        for ax, b in zip(axes[0], benches, strict=False):
            for r in (r for r in roc if r["benchmark"] == b):
                ax.plot(
                    r["_curves"]["roc"]["fpr"],
                    r["_curves"]["roc"]["tpr"],
                    lw=1,
                    label=f"{r['method']} ({r['auc']['value']:.2f})",
                )
            ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title(f"{b}: mislabel detection")
            ax.legend(fontsize=6)
        fig.tight_layout()
        p = plots / "mislabel_roc.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)
    scatter = [r for r in rows if "loo_scatter" in r["_curves"]]
    if scatter:
        n = len(scatter)
        cols = min(n, 5)
        fig, axes = plt.subplots(
            math.ceil(n / cols), cols, figsize=(3 * cols, 2.8 * math.ceil(n / cols)), squeeze=False
        )
        for ax, r in zip(axes.ravel(), scatter, strict=False):
            c = r["_curves"]["loo_scatter"]
            ax.scatter(c["score"], c["loo_effect"], s=6)
            ax.set_title(f"{r['benchmark']}/{r['method']}", fontsize=8)
            ax.set_xlabel("score", fontsize=7)
            ax.set_ylabel("LOO effect", fontsize=7)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        fig.tight_layout()
        p = plots / "loo_scatter.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)
    return made


def _html(rows: list[dict[str, Any]], images: list[Path], base: Path, fmt: Any) -> str:
    import html

    cells = []
    for r in rows:
        lds_e, loo_e, auc_e = r.get("lds", {}), r.get("loo", {}), r.get("auc", {})
        vals = [
            r["benchmark"],
            r["method"],
            fmt(lds_e.get("value")),
            f"[{fmt(lds_e.get('ci_low'))}, {fmt(lds_e.get('ci_high'))}]",
            fmt(lds_e.get("noise_ceiling")),
            fmt(loo_e.get("value")),
            fmt(auc_e.get("value")),
            fmt(r.get("attribution_seconds"), 1),
        ]
        cells.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in vals) + "</tr>")
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "benchmark",
            "method",
            "LDS",
            "95% CI",
            "noise ceiling",
            "LOO corr",
            "AUC",
            "time (s)",
        )
    )
    imgs = "".join(f'<p><img src="{html.escape(os.path.relpath(p, base))}"></p>' for p in images)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>tdabench report</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style>"
        f"</head><body><h1>tdabench report</h1><table><tr>{head}</tr>{''.join(cells)}</table>{imgs}"
        "</body></html>\n"
    )
