"""``tdabench attribute``: scores of one attributor on verified reference models."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from tdabench._io import read_json_checked, read_safetensors, safe_join
from tdabench.benchmark.targets import make_loss_func, make_target_func
from tdabench.errors import ConfigError, IntegrityError, ShapeError
from tdabench.groundtruth.progress import is_terminal
from tdabench.pipeline.config import spec_hash
from tdabench.pipeline.io import write_scores, write_self_scores, write_sidecar
from tdabench.pipeline.stages._common import check_data, load, provenance, read_noisy, threads
from tdabench.pipeline.stages._common import device as resolve_device
from tdabench.pipeline.stages.attributor import make_attributor
from tdabench.task import AttributionTask

__all__ = ["LoggedLoader", "attribute", "load_models"]

logger = logging.getLogger(__name__)


class LoggedLoader(DataLoader):
    """A ``DataLoader`` whose batches are reported as log lines where stderr is no terminal.

    On a terminal the attributors draw their own tqdm bars (``disable=None``); elsewhere (a rule's
    log, a SLURM job) this logs a line at most every ``every_s`` seconds and at the end of each
    pass: ``"<desc>: pass 2, batch 7/10, 17 batches in 31.0 s"``.
    """

    def __init__(self, *args: Any, desc: str = "batches", every_s: float = 30.0, **kw: Any):
        super().__init__(*args, **kw)
        self.desc, self.every_s = desc, every_s
        self.passes = self.batches = 0
        self._t0 = self._last = time.perf_counter()

    def __iter__(self) -> Any:
        if is_terminal():
            yield from super().__iter__()
            return
        self.passes += 1
        n = len(self)
        for i, batch in enumerate(super().__iter__(), 1):
            yield batch
            self.batches += 1
            now = time.perf_counter()
            if i == n or now - self._last >= self.every_s:
                self._last = now
                logger.info(
                    "%s: pass %d, batch %d/%d, %d batches in %.1f s",
                    self.desc, self.passes, i, n, self.batches, now - self._t0,
                )  # fmt: skip


def load_models(
    models_dir: str, spec: Mapping[str, Any], variant: str, expect: Mapping[str, Any]
) -> list[dict[str, torch.Tensor]]:
    """The verified state dicts an attributor config asks for (``checkpoints`` kind and count).

    Names come from ``manifest.json`` (verified; each name must stay inside ``models_dir``) and
    every file's tensors are re-hashed against both its own stamp and the manifest's record.

    Raises:
        IntegrityError / ProvenanceError / UnsafePathError / UnsafeFileError: naming the file.
    """
    fix = "rerun the train stage"
    manifest = read_json_checked(
        Path(models_dir) / "manifest.json", expect, what="models manifest", fix=fix
    )
    per_model = manifest["files"].get(variant) or []
    c = spec["checkpoints"]
    names = (
        [m[-1] for m in per_model[: c["count"]]]
        if c["kind"] == "final"
        else (per_model[0][-c["count"] :] if per_model else [])
    )
    # the noisy-label variant is one model: an ensemble config uses what there is
    if len(names) < (c["count"] if variant == "clean" else 1):
        raise IntegrityError(
            f"{models_dir}/manifest.json lists {len(names)} {variant} checkpoint(s) of kind "
            f"{c['kind']}, the attributor needs {c['count']}; {fix} with a larger train.ensemble"
            "/train.checkpoints"
        )
    states = []
    for name in names:
        path = safe_join(models_dir, name, "models manifest entry")
        tensors, meta = read_safetensors(path, expect, require_checksum=True)
        if meta["tensors_sha256"] != manifest["checksums"].get(name):
            raise IntegrityError(
                f"{str(path)!r} has checksum {meta['tensors_sha256'][:16]}..., but the manifest "
                f"records {str(manifest['checksums'].get(name))[:16]}...; {fix}"
            )
        states.append(tensors)
    return states


def _loaders(
    data: Any, labels: Any, n_test: int, batch_size: int, desc: str = "attribute"
) -> tuple[Any, Any]:
    train_x = (data.train[0], labels)
    test_x = (data.test[0][:n_test], data.test[1][:n_test])
    kw: dict[str, Any] = {"batch_size": batch_size, "shuffle": False}
    tl = LoggedLoader(TensorDataset(*train_x), desc=f"{desc} train loader", **kw)
    vl = LoggedLoader(TensorDataset(*test_x), desc=f"{desc} test loader", **kw)
    return tl, vl


def _run(
    a: Mapping[str, Any],
    setting: Any,
    states: Sequence[Mapping[str, torch.Tensor]],
    loaders: tuple[Any, Any],
    self_only: bool,
    dev: str,
) -> tuple[torch.Tensor, float, dict[str, Any]]:
    model = setting.build_model().eval()  # no dropout noise / batch statistics in gradients
    task = AttributionTask(
        loss_func=make_loss_func(model, setting.kind),
        model=model,
        checkpoints=list(states),
        target_func=make_target_func(model, setting.kind, a["target"]),
    )
    attributor, resolved = make_attributor(a, task, model, setting, len(states), dev)
    tl, vl = loaders
    t0 = time.perf_counter()
    attributor.cache(tl)
    if self_only:
        result = attributor.self_attribute(tl)
    else:
        result = attributor.attribute(tl, vl)
        if getattr(attributor, "score_layout", "train_test") == "test_train":
            result = result.T  # declared (n_test, n_train): dattri's KNN-Shapley layout
        want = (len(tl.dataset), len(vl.dataset))
        if tuple(result.shape) != want:
            raise ShapeError(
                f"{a['method']} returned {tuple(result.shape)} scores, not (n_train, n_test) = "
                f"{want}; an attributor returns (n_train, n_test) or declares score_layout = 'test_train'"
            )
    return result.detach().cpu(), time.perf_counter() - t0, resolved


def _wants_auc(metrics: list[str] | None, setting: Any) -> bool:
    want = metrics is None or "auc" in metrics
    if want and setting.kind != "classification":
        if metrics is not None:
            raise ConfigError(
                f"{setting.name} is a {setting.kind} setting: mislabel detection (auc) needs "
                "class labels; remove auc from the benchmark's metrics"
            )
        return False
    return want


def _num_test(spec: Mapping[str, Any], data: Any) -> int:
    have = len(data.test[1])
    n = spec["num_test"] or have
    if n > have:
        raise ConfigError(f"data.num_test is {n} but the split has {have} test points; lower it")
    return n


def attribute(
    spec: Mapping[str, Any],
    data_dir: str,
    models_dir: str,
    out: str,
    out_self: str,
    metrics: list[str] | None = None,
    device: str = "auto",
    benchmark: str | None = None,
) -> None:
    """Run one attributor: ``(n_train, n_test)`` scores on the clean models, and self-scores on
    the noisy-label model when AUC is evaluated. Inputs are verified first (data record, noisy
    labels, models manifest and every checkpoint's checksum); the outputs carry the provenance
    (benchmark, spec hash, data, models, method, resolved arguments); timings go to the sidecars.
    """
    threads()
    dev = resolve_device(device)
    train_spec, a = spec["train"], spec["attributor"]
    setting, data = load(train_spec)
    fp = check_data(train_spec["prepare"], data, data_dir, benchmark)
    want_auc = _wants_auc(metrics, setting)
    n_test = _num_test(spec, data)
    expect = {"spec_hash": spec_hash(train_spec), "data": fp}
    expect.update({"benchmark": benchmark} if benchmark else {})
    clean = load_models(models_dir, a, "clean", expect)
    prov = provenance(benchmark, "attribute", spec, data=fp, method=spec["method"], n_test=n_test)
    logger.info(
        "attribute %s on %s: %d train x %d test, %d model(s) on %s; spec hash %s",
        spec["method"], benchmark, len(data.train[1]), n_test, len(clean), dev, prov["spec_hash"],
    )  # fmt: skip
    loaders = _loaders(data, data.train[1], n_test, a["batch_size"], spec["method"])
    scores, seconds, resolved = _run(a, setting, clean, loaders, False, dev)
    logger.info("attribute %s: scores %s in %.1f s; arguments %s", spec["method"],
                tuple(scores.shape), seconds, resolved)  # fmt: skip
    write_scores(out, scores, {"method": a["method"]}, {**prov, "attributor": resolved})
    write_sidecar(out, {"seconds": seconds})
    self_scores, s_seconds = torch.zeros(0), 0.0
    if want_auc:
        noisy_path = Path(data_dir) / "noisy.parquet"
        noisy = read_noisy(noisy_path, benchmark, fp, len(data.train[1]))
        labels = torch.as_tensor(noisy.column("noisy_label").to_numpy().copy())
        noisy_states = load_models(models_dir, a, "noisy", expect)
        loaders = _loaders(data, labels, n_test, a["batch_size"], f"{spec['method']} (self)")
        self_scores, s_seconds, _ = _run(a, setting, noisy_states, loaders, True, dev)
        logger.info("attribute %s: self-scores in %.1f s", spec["method"], s_seconds)
    prov_self = {**prov, "attributor": resolved}
    write_self_scores(out_self, self_scores, {"method": a["method"]}, prov_self)
    write_sidecar(out_self, {"seconds": s_seconds})
