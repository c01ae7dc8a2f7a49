"""A benchmark's recipe may set ``autocast``; unset, every recipe and provenance key is unchanged."""

from __future__ import annotations

import pytest

from tdabench.benchmark import get_setting, list_settings
from tdabench.benchmark.data.common import import_optional
from tdabench.benchmark.settings import OPTIONAL_RECIPE_KEYS
from tdabench.errors import ConfigError, DataError
from tdabench.groundtruth.optim import normalize_recipe
from tdabench.pipeline.config import validate


def test_autocast_is_set_only_when_given() -> None:
    assert OPTIONAL_RECIPE_KEYS == ("autocast",)
    for name in list_settings():  # the registry's recipes (and so their keys) lack it
        assert "autocast" not in get_setting(name).recipe
    plain = get_setting("mnist_mlp")
    for unset in ({"autocast": None}, {"recipe": {"autocast": None}}):
        assert get_setting("mnist_mlp", **unset).to_dict() == plain.to_dict()
    bf16 = get_setting("mnist_mlp", autocast="bf16")
    assert bf16.recipe == {**plain.recipe, "autocast": "bf16"}
    assert get_setting("mnist_mlp", recipe={"autocast": "bf16"}) == bf16
    assert bf16.to_dict() != plain.to_dict() and hash(bf16) != hash(plain)
    assert normalize_recipe(bf16.recipe)["autocast"] == "bf16"  # what the trainers read
    assert normalize_recipe(plain.recipe)["autocast"] is None


def test_autocast_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"autocast must be null or one of \['bf16'\]"):
        get_setting("mnist_lr", autocast="fp16")
    with pytest.raises(ConfigError, match="unknown recipe keys"):
        get_setting("mnist_lr", recipe={"autocasts": "bf16"})


def test_benchmark_yaml_recipe_accepts_autocast() -> None:
    cfg = validate({"setting": "mnist_lr", "recipe": {"autocast": "bf16"}}, "benchmark", "x.yaml")
    assert cfg["recipe"] == {"autocast": "bf16"}
    assert validate({"setting": "mnist_lr"}, "benchmark", "x.yaml")["recipe"] == {}
    with pytest.raises(ConfigError, match="autocast"):
        validate({"setting": "mnist_lr", "recipe": {"autocast": "fp8"}}, "benchmark", "x.yaml")


def test_import_optional_names_the_package() -> None:
    assert import_optional("json", "unused").dumps([1]) == "[1]"
    with pytest.raises(DataError, match="needs PyPI nothing"):
        import_optional("tdabench_no_such_module", "this needs PyPI nothing")
