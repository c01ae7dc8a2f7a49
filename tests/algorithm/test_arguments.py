"""Declared arguments: validation, round trips, the registry."""

from __future__ import annotations

import dataclasses

import pytest

from tdabench.algorithm.arguments import (
    MethodArguments,
    arguments_for,
    register_arguments,
    registered_methods,
)
from tdabench.errors import ConfigError

METHODS = [
    "IFAttributorExplicit",
    "IFAttributorCG",
    "IFAttributorLiSSA",
    "IFAttributorArnoldi",
    "TracInAttributor",
    "GradDotAttributor",
    "GradCosAttributor",
    "RPSAttributor",
    "TRAKAttributor",
]
REQUIRED = {
    "TracInAttributor": {"weight_list": [0.1]},
    "RPSAttributor": {"final_linear_layer_name": "fc"},
}


@pytest.mark.parametrize("name", METHODS)
def test_round_trip_and_unknown_key(name):
    cls = arguments_for(name)
    args = cls.from_dict(REQUIRED.get(name, {}))
    again = cls.from_dict(args.to_dict())
    assert again == args
    with pytest.raises(ConfigError, match="valid keys"):
        cls.from_dict({**REQUIRED.get(name, {}), "no_such_key": 1})
    assert name in registered_methods()


@pytest.mark.parametrize(
    "name, values, key",
    [
        ("IFAttributorCG", {"max_iter": 0}, "max_iter"),
        ("IFAttributorCG", {"mode": "fwd"}, "mode"),
        ("IFAttributorCG", {"hessian": "fisher"}, "hessian"),
        ("IFAttributorLiSSA", {"damping": 1.0}, "damping"),
        ("IFAttributorArnoldi", {"precompute_data_ratio": 1.5}, "precompute_data_ratio"),
        ("IFAttributorExplicit", {"memory_budget": "lots"}, "memory_budget"),
        ("TracInAttributor", {"weight_list": []}, "weight_list"),
        (
            "TracInAttributor",
            {"weight_list": [1.0], "projector_kwargs": {"proj_dim": 0}},
            "proj_dim",
        ),
        ("RPSAttributor", {"final_linear_layer_name": "fc", "l2_strength": 0.0}, "l2_strength"),
        ("TRAKAttributor", {"regularization": -1}, "regularization"),
        ("GradDotAttributor", {"checkpoint_index": 0.5}, "checkpoint_index"),
    ],
)
def test_invalid_values_name_the_key(name, values, key):
    with pytest.raises(ConfigError, match=key):
        arguments_for(name).from_dict(values)


def test_missing_required_and_unknown_method():
    with pytest.raises(ConfigError, match="weight_list"):
        arguments_for("TracInAttributor").from_dict({})
    with pytest.raises(ConfigError, match="registered methods"):
        arguments_for("NoSuchAttributor")


def test_register_new_method():
    @register_arguments("_TestOnlyAttributor")
    @dataclasses.dataclass
    class _Args(MethodArguments):
        damping: float = 0.1

    assert arguments_for("_TestOnlyAttributor") is _Args
    assert _Args.from_dict({"damping": 0.5}).to_dict() == {"damping": 0.5}
    with pytest.raises(ConfigError, match="already registered"):
        register_arguments("_TestOnlyAttributor")(type("Other", (MethodArguments,), {}))
