"""``load_benchmark``: dattri's ``(model_details, groundtruth)`` from tdabench's ground-truth store.

dattri downloads pickled checkpoints and ground truth from a web hub without checksums.
tdabench never downloads: :func:`load_benchmark` reads what the pipeline produced under
``<download_path>/<dataset>_<model>/`` (``results/`` by default)::

    data/<hash>/meta.json                  the split's identity and the prepare spec
    models/<hash>/manifest.json            reference models (safetensors), one list per model
    groundtruth/<metric>/<hash>/           the verified ground-truth store (shards), and
    groundtruth/<metric>/<hash>/merged-<n>.parquet  its merged file

Produce it with ``snakemake groundtruth_<dataset>_<model>`` (ground truth) and
``snakemake scores_<dataset>_<model>`` (reference models), or fetch a lab's copy with
``dvc pull``. Every file read is verified (checksums, provenance keys).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from tdabench.benchmark.datasets._common import (
    LabelledDataset,
    evaluate_per_sample,
    load_weights,
    seed_everything,
    train_epochs,
)
from tdabench.benchmark.settings import (
    RECIPE_DEFAULTS,
    BenchmarkSetting,
    get_setting,
    list_settings,
)
from tdabench.benchmark.targets import margin_from_logits
from tdabench.benchmark.utils import SubsetSampler
from tdabench.errors import ConfigError, DataError, StoreError
from tdabench.groundtruth.optim import make_torch_optimizer, normalize_recipe

__all__ = ["load_benchmark"]

logger = logging.getLogger(__name__)


def _commands(identifier: str, root: Path) -> str:
    return (
        f"produce it with `snakemake groundtruth_{identifier}` (and `snakemake scores_{identifier}` for the "
        f"reference models), or fetch a lab's copy with `dvc pull {root}`; tdabench never downloads pickles"
    )


def _find_groundtruth(root: Path, metric: str, identifier: str) -> tuple[Path, dict[str, Any]]:
    """The merged file (largest count) or the store directory of the one ground truth of ``metric``."""
    from tdabench.groundtruth.store import read_table_checked

    base = root / "groundtruth" / metric
    stores = sorted(p for p in base.glob("*") if p.is_dir()) if base.is_dir() else []
    if not stores:
        raise StoreError(
            f"no {metric} ground truth under {str(base)!r}; {_commands(identifier, root.parent)}"
        )
    if len(stores) > 1:
        raise StoreError(
            f"{str(base)!r} holds {len(stores)} {metric} ground truths of different configurations "
            f"({[p.name for p in stores]}); keep the one you mean (or pass download_path to a copy holding it)"
        )
    merged = sorted(stores[0].glob("merged-*.parquet"), key=lambda p: int(p.stem.split("-")[-1]))
    if merged:
        _, meta = read_table_checked(merged[-1])
        return merged[-1], json.loads(meta["config"])
    from tdabench.groundtruth.store import GroundTruthStore

    return stores[0], GroundTruthStore(stores[0]).config


def _prepare_spec(root: Path, data_meta: Any) -> dict[str, Any] | None:
    """The prepare spec recorded beside the split the ground truth was computed on."""
    for meta_file in sorted((root / "data").glob("*/meta.json")):
        recorded = json.loads(meta_file.read_text())
        if data_meta is None or recorded.get("data") == data_meta:
            return recorded["spec"]
    return None


def _setting_and_data(
    identifier: str, root: Path, config: dict[str, Any]
) -> tuple[BenchmarkSetting, Any, Any]:
    data_meta = (config.get("data") or {}).get("meta")
    spec = _prepare_spec(root, data_meta)
    if spec is None:
        raise DataError(
            f"no data/<hash>/meta.json under {str(root)!r} matches the ground truth's data; "
            f"{_commands(identifier, root.parent)}"
        )
    # the recipe the ground truth was trained with (the trainer's fingerprint) also drives train_func
    recipe = (config.get("trainer") or {}).get("recipe") or {}
    recipe = {k: v for k, v in recipe.items() if k in RECIPE_DEFAULTS}
    setting = get_setting(spec["setting"], **{**spec.get("overrides", {}), **recipe})
    data = setting.load(data_root=spec.get("data_root"), seed=spec["data"]["seed"])
    if data_meta is not None and data.meta != data_meta:
        raise DataError(
            f"the data loaded now (data_root={spec.get('data_root')!r}) differs from the data the ground truth "
            "was computed on; restore the original data files"
        )
    return setting, data, spec


def _model_files(root: Path, spec: dict[str, Any]) -> list[Path]:
    """Final checkpoint of every clean reference model trained on this split."""
    for manifest in sorted((root / "models").glob("*/manifest.json")):
        doc = json.loads(manifest.read_text())
        prep = doc.get("spec", {}).get("prepare", {})
        if all(prep.get(k) == spec.get(k) for k in ("setting", "overrides", "data", "data_root")):
            return [manifest.parent / files[-1] for files in doc["files"]["clean"]]
    logger.warning(
        "no reference models under %s for this split; models_full is empty", root / "models"
    )
    return []


def _per_sample(setting: BenchmarkSetting, what: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-sample loss or target ``(logits, labels) -> (B,)`` (sequences: mean over tokens)."""

    def ce(z: Tensor, y: Tensor) -> Tensor:
        if setting.kind == "sequence":
            return F.cross_entropy(z.transpose(1, 2), y, reduction="none").mean(dim=1)
        return F.cross_entropy(z, y, reduction="none")

    if what == "loss":
        return ce
    if what == "neg_loss":
        return lambda z, y: -ce(z, y)
    if what == "margin":
        return lambda z, y: (
            margin_from_logits(z, y).mean(dim=1)
            if setting.kind == "sequence"
            else margin_from_logits(z, y)
        )
    raise ConfigError(f"unknown target {what!r}")


def _file_func(setting: BenchmarkSetting, what: str) -> Callable[..., Tensor]:
    value_fn = _per_sample(setting, what)

    def func(
        model_path: str | os.PathLike, dataloader: Iterable[Any], device: str = "cpu"
    ) -> Tensor:
        model = load_weights(setting.build_model(), model_path, device)
        return evaluate_per_sample(model, dataloader, device, value_fn)

    func.__name__ = f"{setting.name}_{what}"
    return func


def _train_func(setting: BenchmarkSetting) -> Callable[..., nn.Module]:
    ce = _per_sample(setting, "loss")

    def train_func(dataloader: Iterable[Any], seed: int = 0, device: str = "cpu") -> nn.Module:
        seed_everything(seed)
        model = setting.build_model()
        opt = make_torch_optimizer(normalize_recipe(setting.recipe), model.parameters())
        return train_epochs(
            model, dataloader, opt, setting.recipe["epochs"], device, lambda z, y: ce(z, y).mean()
        )

    train_func.__name__ = f"train_{setting.name}"
    return train_func


def load_benchmark(
    model: str,
    dataset: str,
    metric: str,
    download_path: str | os.PathLike = "results",
    redownload: bool = False,
) -> tuple[dict[str, Any], tuple[Tensor, Tensor]]:
    """Load a benchmark setting and its ground truth from the local store (dattri's call shape).

    Args:
        model: ``"lr"``, ``"mlp"``, ``"resnet9"``, ``"musictransformer"`` or ``"nanogpt"``.
        dataset: ``"mnist"``, ``"cifar2"``, ``"maestro"`` or ``"shakespeare"``; the benchmark is
            ``f"{dataset}_{model}"`` (a name of :func:`tdabench.benchmark.list_settings`).
        metric: ``"lds"`` or ``"loo"``.
        download_path: the pipeline's results directory (``results_dir``; ``results/`` by default).
        redownload: must be ``False``: nothing is downloaded (see the module docstring).

    Returns:
        ``(model_details, groundtruth)``. ``model_details`` has dattri's keys: ``"model"`` (the
        setting's model, eval mode), ``"models_full"`` (final checkpoints of the reference
        models, safetensors paths), ``"models_half"`` (``[]``: the pipeline trains its
        ensemble on the full training set), ``"train_dataset"`` / ``"test_dataset"``
        (``(inputs, labels)`` datasets in ground-truth index order), ``"train_sampler"`` /
        ``"test_sampler"`` (:class:`SubsetSampler` over all of them), ``"loss_func"`` /
        ``"target_func"`` (``f(model_path, dataloader, device="cpu") -> (n,)``: per-sample
        loss / the ground truth's target) and ``"train_func"`` (``f(dataloader, seed=0,
        device="cpu") -> model``, the setting's recipe for its epochs). ``groundtruth`` is
        ``(values (S, n_test) float64, indices)``, indices ``(S, subset_size)`` for LDS or the
        ``(S,)`` removed indices for LOO, as :func:`tdabench.metric.lds` / ``loo_corr`` take.
        Values are the stored target averaged over runs (no sign flip: LDS stores a
        higher-is-better target such as the margin).

    Raises:
        ConfigError: unknown benchmark or metric, or ``redownload=True``.
        StoreError / DataError: the store or its data is missing or does not verify (the message
            names the ``snakemake`` / ``dvc pull`` command that produces it).
    """
    from tdabench.groundtruth import load_ground_truth

    identifier = f"{dataset}_{model}"
    if identifier not in list_settings():
        raise ConfigError(f"unknown benchmark {identifier!r}; available: {list_settings()}")
    if metric not in ("lds", "loo"):
        raise ConfigError(f"metric must be 'lds' or 'loo', got {metric!r}")
    root = Path(download_path).expanduser() / identifier
    if redownload:
        raise ConfigError(
            f"redownload=True: tdabench never downloads. Refresh {str(root)!r} with `dvc pull {root}` or "
            f"recompute it with `snakemake groundtruth_{identifier}`"
        )
    gt_path, config = _find_groundtruth(root, metric, identifier)
    values, indices = load_ground_truth(gt_path, config["targets"][0])
    setting, data, spec = _setting_and_data(identifier, root, config)
    return _details(setting, data, _model_files(root, spec), config["targets"][0]), (
        values,
        indices,
    )


def _details(
    setting: BenchmarkSetting, data: Any, models: list[Path], target: str
) -> dict[str, Any]:
    """dattri's ``model_details`` dict (see :func:`load_benchmark`)."""
    return {
        "model": setting.build_model().eval(),
        "models_full": models,
        "models_half": [],
        "train_dataset": LabelledDataset(*data.train[:2]),
        "test_dataset": LabelledDataset(*data.test[:2]),
        "train_sampler": SubsetSampler(range(data.n_train)),
        "test_sampler": SubsetSampler(range(data.n_test)),
        "loss_func": _file_func(setting, "loss"),
        "target_func": _file_func(setting, target),
        "train_func": _train_func(setting),
    }
