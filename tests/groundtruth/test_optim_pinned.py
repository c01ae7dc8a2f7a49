"""``normalize_recipe`` pinned: outputs (values, types and key order) and every error message.

The oracle is the function before issue 15's split into short checks (commit c14ab0f): the
split must keep the order of the checks (which error a recipe with several faults raises), the
messages and the coercions (``"0.5"`` -> ``0.5``, ``8.0`` -> ``8``, tuples -> lists).
"""

from __future__ import annotations

import pytest

from tdabench.errors import ConfigError
from tdabench.groundtruth.optim import normalize_recipe

B = dict(lr=0.1, epochs=2, batch_size=4)
KEYS = (
    "['autocast', 'batch_size', 'betas', 'epochs', 'eps', 'grad_clip', 'lr', 'lr_min', "
    "'max_iters', 'momentum', 'optimizer', 'warmup_iters', 'weight_decay']"
)

BAD = [
    (
        [1, 2],
        "recipe must be a dict, got list; pass e.g. "
        "{'optimizer': 'sgd', 'lr': 0.01, 'epochs': 20, 'batch_size': 32}",
    ),
    (
        dict(B, momentun=0.9, zzz=1),
        f"unknown recipe keys ['momentun', 'zzz']; allowed keys are {KEYS}",
    ),
    (
        dict(B, optimizer="rmsprop", lr=-1),
        "recipe optimizer 'rmsprop' is not supported; use one of ('sgd', 'adam', 'adamw')",
    ),
    (
        dict(epochs=1, batch_size=2),
        "recipe lr must be a positive float, got None; set e.g. 'lr': 0.01",
    ),
    (dict(B, lr=0.0), "recipe lr must be a positive float, got 0.0; set e.g. 'lr': 0.01"),
    (
        dict(B, lr=-1, batch_size=0),
        "recipe lr must be a positive float, got -1; set e.g. 'lr': 0.01",
    ),
    (dict(lr=0.1, epochs=2), "recipe batch_size must be a positive int, got None"),
    (dict(B, batch_size=0, max_iters=0), "recipe batch_size must be a positive int, got 0"),
    (dict(B, max_iters=0, epochs=0), "recipe max_iters must be a positive int or null, got 0"),
    (
        dict(lr=0.1, batch_size=2),
        "recipe epochs must be a positive int (or set max_iters), got None",
    ),
    (
        dict(B, epochs=0, momentum=-1),
        "recipe epochs must be a positive int (or set max_iters), got 0",
    ),
    (dict(B, momentum=-0.1, weight_decay=-1), "recipe momentum must be >= 0, got -0.1"),
    (dict(B, weight_decay=-1), "recipe weight_decay must be >= 0, got -1.0"),
    (dict(B, eps=-1e-8), "recipe eps must be >= 0, got -1e-08"),
    (
        dict(B, optimizer="adam", momentum=0.9, betas=[2]),
        "recipe momentum=0.9 only applies to 'sgd'; use 'betas' for 'adam'",
    ),
    (dict(B, betas=[0.9]), "recipe betas must be two floats in [0, 1), got [0.9]"),
    (dict(B, betas=[0.9, 1.0]), "recipe betas must be two floats in [0, 1), got [0.9, 1.0]"),
    (
        dict(B, betas=[-0.1, 0.5], warmup_iters=-1),
        "recipe betas must be two floats in [0, 1), got [-0.1, 0.5]",
    ),
    (dict(B, warmup_iters=-1, lr_min=5), "recipe warmup_iters must be >= 0, got -1"),
    (dict(B, lr_min=0.2, grad_clip=0), "recipe lr_min must lie in [0, lr=0.1], got 0.2"),
    (dict(B, lr_min=-0.01), "recipe lr_min must lie in [0, lr=0.1], got -0.01"),
    (
        dict(B, grad_clip=0.0, autocast="x"),
        "recipe grad_clip must be a positive float or null, got 0.0",
    ),
    (dict(B, grad_clip=-2), "recipe grad_clip must be a positive float or null, got -2.0"),
    (dict(B, autocast="fp16"), "recipe autocast must be null or one of ['bf16'], got 'fp16'"),
]

GOOD = [
    (
        B,
        "{'optimizer': 'sgd', 'lr': 0.1, 'momentum': 0.0, 'weight_decay': 0.0, 'betas': [0.9, 0.999], "
        "'eps': 1e-08, 'epochs': 2, 'batch_size': 4, 'max_iters': None, 'warmup_iters': 0, "
        "'lr_min': None, 'grad_clip': None, 'autocast': None}",
    ),
    (
        dict(optimizer="SGD", lr="0.5", epochs="3", batch_size=8.0, momentum=1, weight_decay="0", eps=0),
        "{'optimizer': 'sgd', 'lr': 0.5, 'momentum': 1.0, 'weight_decay': 0.0, 'betas': [0.9, 0.999], "
        "'eps': 0.0, 'epochs': 3, 'batch_size': 8, 'max_iters': None, 'warmup_iters': 0, "
        "'lr_min': None, 'grad_clip': None, 'autocast': None}",
    ),
    (
        dict(
            optimizer="AdamW", lr=1e-3, max_iters="7", batch_size="16", betas=(0.8, "0.9"),
            warmup_iters="2", lr_min="1e-5", grad_clip="1", autocast="bf16",
        ),
        "{'optimizer': 'adamw', 'lr': 0.001, 'momentum': 0.0, 'weight_decay': 0.0, 'betas': [0.8, 0.9], "
        "'eps': 1e-08, 'epochs': None, 'batch_size': 16, 'max_iters': 7, 'warmup_iters': 2, "
        "'lr_min': 1e-05, 'grad_clip': 1.0, 'autocast': 'bf16'}",
    ),
    (
        dict(optimizer="adam", lr=1, epochs=None, max_iters=5, batch_size=1, lr_min=1),
        "{'optimizer': 'adam', 'lr': 1.0, 'momentum': 0.0, 'weight_decay': 0.0, 'betas': [0.9, 0.999], "
        "'eps': 1e-08, 'epochs': None, 'batch_size': 1, 'max_iters': 5, 'warmup_iters': 0, "
        "'lr_min': 1.0, 'grad_clip': None, 'autocast': None}",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("recipe", "message"), BAD)
def test_first_fault_and_its_message(recipe, message):
    with pytest.raises(ConfigError) as err:
        normalize_recipe(recipe)
    assert str(err.value) == message


@pytest.mark.parametrize(("recipe", "expected"), GOOD)
def test_normalised_values_types_and_order(recipe, expected):
    before = dict(recipe)
    assert repr(normalize_recipe(recipe)) == expected
    assert recipe == before  # the argument is not modified
