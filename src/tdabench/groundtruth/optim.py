"""Training recipes, learning-rate schedules and functional optimisers on stacked parameters.

The functional optimisers update dictionaries of *stacked* tensors (leading dimension
``m`` = number of models trained together) and follow ``torch.optim.SGD`` / ``Adam`` /
``AdamW`` update rules step for step, so that a batched run and a plain ``torch.optim``
loop agree to float rounding. Each model may be *inactive* on a step (its minibatch had
no members); an inactive model's parameters and optimiser state (momentum, moments,
Adam step count) stay exactly as they were, as if the step had not happened for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tdabench.errors import ConfigError

__all__ = [
    "AUTOCAST_DTYPES",
    "RECIPE_DEFAULTS",
    "FunctionalOptimizer",
    "clip_grad_norms_",
    "lr_at",
    "make_torch_optimizer",
    "normalize_recipe",
]

#: Every recipe key the trainers understand, with its default.
RECIPE_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": None,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "epochs": None,
    "batch_size": None,
    "max_iters": None,
    "warmup_iters": 0,
    "lr_min": None,
    "grad_clip": None,
    "autocast": None,
}

#: Values of the recipe key ``autocast``: ``None`` (off) or the autocast dtype's name.
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16}

_OPTIMIZERS = ("sgd", "adam", "adamw")


def normalize_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a recipe dict and fill in the defaults.

    Args:
        recipe: training recipe with the keys of :data:`RECIPE_DEFAULTS`; ``lr``,
            ``batch_size`` and one of ``epochs`` / ``max_iters`` are required.

    Returns:
        A new, JSON-able dict holding every key of :data:`RECIPE_DEFAULTS`.

    Raises:
        ConfigError: unknown keys, missing required keys or out-of-range values.
    """
    if not isinstance(recipe, Mapping):
        raise ConfigError(
            f"recipe must be a dict, got {type(recipe).__name__}; pass e.g. "
            "{'optimizer': 'sgd', 'lr': 0.01, 'epochs': 20, 'batch_size': 32}"
        )
    unknown = sorted(set(recipe) - set(RECIPE_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown recipe keys {unknown}; allowed keys are {sorted(RECIPE_DEFAULTS)}"
        )
    r = dict(RECIPE_DEFAULTS)
    r.update(recipe)
    # in this order: which fault a recipe with several reports is part of the behaviour
    _normalize_schedule(r)
    _normalize_optimizer(r)
    _normalize_extras(r)
    return r


def _normalize_schedule(r: dict[str, Any]) -> None:
    """Check and coerce ``optimizer``, ``lr``, ``batch_size``, ``max_iters`` / ``epochs``."""
    r["optimizer"] = str(r["optimizer"]).lower()
    if r["optimizer"] not in _OPTIMIZERS:
        raise ConfigError(
            f"recipe optimizer {r['optimizer']!r} is not supported; use one of {_OPTIMIZERS}"
        )
    if r["lr"] is None or not float(r["lr"]) > 0:
        raise ConfigError(
            f"recipe lr must be a positive float, got {r['lr']!r}; set e.g. 'lr': 0.01"
        )
    r["lr"] = float(r["lr"])
    if r["batch_size"] is None or int(r["batch_size"]) < 1:
        raise ConfigError(f"recipe batch_size must be a positive int, got {r['batch_size']!r}")
    r["batch_size"] = int(r["batch_size"])
    if r["max_iters"] is not None:
        if int(r["max_iters"]) < 1:
            raise ConfigError(
                f"recipe max_iters must be a positive int or null, got {r['max_iters']!r}"
            )
        r["max_iters"] = int(r["max_iters"])
    elif r["epochs"] is None or int(r["epochs"]) < 1:
        raise ConfigError(
            f"recipe epochs must be a positive int (or set max_iters), got {r['epochs']!r}"
        )
    if r["epochs"] is not None:
        r["epochs"] = int(r["epochs"])


def _normalize_optimizer(r: dict[str, Any]) -> None:
    """Check and coerce ``momentum``, ``weight_decay``, ``eps`` and ``betas``."""
    for key in ("momentum", "weight_decay", "eps"):
        r[key] = float(r[key])
        if r[key] < 0:
            raise ConfigError(f"recipe {key} must be >= 0, got {r[key]}")
    if r["momentum"] > 0 and r["optimizer"] != "sgd":
        raise ConfigError(
            f"recipe momentum={r['momentum']} only applies to 'sgd'; use 'betas' for {r['optimizer']!r}"
        )
    betas = list(r["betas"])
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ConfigError(f"recipe betas must be two floats in [0, 1), got {r['betas']!r}")
    r["betas"] = [float(b) for b in betas]


def _normalize_extras(r: dict[str, Any]) -> None:
    """Check and coerce ``warmup_iters``, ``lr_min``, ``grad_clip`` and ``autocast``."""
    r["warmup_iters"] = int(r["warmup_iters"])
    if r["warmup_iters"] < 0:
        raise ConfigError(f"recipe warmup_iters must be >= 0, got {r['warmup_iters']}")
    if r["lr_min"] is not None:
        r["lr_min"] = float(r["lr_min"])
        if not 0.0 <= r["lr_min"] <= r["lr"]:
            raise ConfigError(f"recipe lr_min must lie in [0, lr={r['lr']}], got {r['lr_min']}")
    if r["grad_clip"] is not None:
        r["grad_clip"] = float(r["grad_clip"])
        if not r["grad_clip"] > 0:
            raise ConfigError(
                f"recipe grad_clip must be a positive float or null, got {r['grad_clip']}"
            )
    if r["autocast"] is not None and r["autocast"] not in AUTOCAST_DTYPES:
        raise ConfigError(
            f"recipe autocast must be null or one of {sorted(AUTOCAST_DTYPES)}, got {r['autocast']!r}"
        )


def lr_at(recipe: Mapping[str, Any], it: int, total_iters: int) -> float:
    """Learning rate at (0-based) stream iteration ``it`` of ``total_iters``.

    Linear warm-up ``lr * (it + 1) / warmup_iters`` for ``it < warmup_iters``; then the
    constant ``lr`` when ``lr_min`` is null, else a cosine decay from ``lr`` at the end of
    warm-up to ``lr_min`` at ``total_iters``.
    """
    base = recipe["lr"]
    warm = recipe["warmup_iters"]
    if it < warm:
        return base * (it + 1) / warm
    lr_min = recipe["lr_min"]
    if lr_min is None:
        return base
    span = max(total_iters - warm, 1)
    ratio = min(max((it - warm) / span, 0.0), 1.0)
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (base - lr_min)


def make_torch_optimizer(recipe: Mapping[str, Any], params: Any) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimiser a recipe describes (used by the sequential trainer)."""
    opt = recipe["optimizer"]
    if opt == "sgd":
        return torch.optim.SGD(
            params,
            lr=recipe["lr"],
            momentum=recipe["momentum"],
            weight_decay=recipe["weight_decay"],
            foreach=False,
        )
    cls = torch.optim.Adam if opt == "adam" else torch.optim.AdamW
    return cls(
        params,
        lr=recipe["lr"],
        betas=tuple(recipe["betas"]),
        eps=recipe["eps"],
        weight_decay=recipe["weight_decay"],
        foreach=False,
    )


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """View a per-model vector ``(m,)`` so it broadcasts against ``like`` ``(m, ...)``."""
    return v.view((-1,) + (1,) * (like.dim() - 1))


def clip_grad_norms_(grads: Mapping[str, Tensor], max_norm: float) -> Tensor:
    """Per-model gradient-norm clipping in place, as ``torch.nn.utils.clip_grad_norm_``.

    Args:
        grads: stacked gradients ``{name: (m, ...)}``.
        max_norm: maximum L2 norm of each model's full gradient.

    Returns:
        The per-model total norms before clipping, shape ``(m,)``.
    """
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1)  # (m, P)
    total = norms.norm(dim=1)  # (m,)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads.values():
        g.mul_(_expand(coef, g))
    return total


class FunctionalOptimizer:
    """SGD / Adam / AdamW on stacked parameter dicts with torch.optim semantics.

    Args:
        recipe: a normalised recipe (:func:`normalize_recipe`).
    """

    def __init__(self, recipe: Mapping[str, Any]) -> None:
        self.recipe = dict(recipe)
        self.kind = self.recipe["optimizer"]

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Any]:
        """Zero optimiser state for stacked ``params`` ``{name: (m, ...)}``."""
        m = next(iter(params.values())).shape[0]
        dev = next(iter(params.values())).device
        if self.kind == "sgd":
            if self.recipe["momentum"] == 0.0:
                return {}
            return {"buf": {k: torch.zeros_like(p) for k, p in params.items()}}
        return {
            "step": torch.zeros(m, dtype=torch.float64, device=dev),
            "exp_avg": {k: torch.zeros_like(p) for k, p in params.items()},
            "exp_avg_sq": {k: torch.zeros_like(p) for k, p in params.items()},
        }

    @torch.no_grad()
    def step(
        self,
        params: dict[str, Tensor],
        grads: Mapping[str, Tensor],
        state: dict[str, Any],
        lr: float,
        active: Tensor | None = None,
    ) -> None:
        """Update ``params`` and ``state`` in place.

        Args:
            params: stacked parameters ``{name: (m, ...)}`` (updated in place).
            grads: stacked gradients of the same shapes (may be overwritten).
            state: the dict from :meth:`init` (updated in place).
            lr: learning rate of this step.
            active: bool ``(m,)``; models where it is False keep parameters and state unchanged.
                ``None`` means every model is active.
        """
        if self.kind == "sgd":
            bufs = state.get("buf", {})
            for k, p in params.items():
                self._sgd(p, grads[k], bufs.get(k), lr, active)
            return
        step = state["step"] + (1.0 if active is None else active.to(torch.float64))
        state["step"] = step
        # bias corrections per model (a model that skipped steps has a smaller count)
        safe = step.clamp(min=1.0)
        beta1, beta2 = self.recipe["betas"]
        bc1 = 1.0 - torch.pow(beta1, safe)
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, safe))
        for k, p in params.items():
            moments = (state["exp_avg"][k], state["exp_avg_sq"][k])
            self._adam(p, grads[k], moments, (bc1, bc2_sqrt), lr, active)

    @staticmethod
    def _commit(old: Tensor, new: Tensor, active: Tensor | None) -> None:
        if active is None:
            old.copy_(new)
        else:
            old.copy_(torch.where(_expand(active, old), new, old))

    def _sgd(
        self, p: Tensor, g: Tensor, buf: Tensor | None, lr: float, active: Tensor | None
    ) -> None:
        """torch.optim.SGD on one stacked parameter ``p`` ``(m, ...)`` (``g`` may be overwritten;
        ``buf`` its momentum buffer, None without momentum)."""
        wd, mu = self.recipe["weight_decay"], self.recipe["momentum"]
        if active is None:  # fast path: every model steps, update in place
            if wd != 0.0:
                g = g.add_(p, alpha=wd)
            if mu != 0.0:  # buf = mu * buf + g in one pass (torch.optim: mul_ then add_)
                g = torch.add(g, buf, alpha=mu, out=buf)
            p.add_(g, alpha=-lr)
            return
        if wd != 0.0:
            g = g.add(p, alpha=wd)
        if mu != 0.0:
            new_buf = buf.mul(mu).add_(g)
            self._commit(buf, new_buf, active)
            g = new_buf
        self._commit(p, p.add(g, alpha=-lr), active)

    def _adam(
        self,
        p: Tensor,
        g: Tensor,
        moments: tuple[Tensor, Tensor],
        corrections: tuple[Tensor, Tensor],
        lr: float,
        active: Tensor | None,
    ) -> None:
        """torch.optim.Adam / AdamW on one stacked parameter ``p`` ``(m, ...)``: ``moments``
        its first and second moments (updated in place), ``corrections`` the per-model bias
        corrections ``1 - beta1**t`` and ``sqrt(1 - beta2**t)``, ``(m,)`` each."""
        wd, eps = self.recipe["weight_decay"], self.recipe["eps"]
        beta1, beta2 = self.recipe["betas"]
        bc1, bc2_sqrt = corrections
        dt = p.dtype
        if self.kind == "adamw" and wd != 0.0:
            p_dec = p.mul(1.0 - lr * wd)
        else:
            p_dec = p
            if wd != 0.0:
                g = g.add(p, alpha=wd)
        m_old, v_old = moments
        m_new = m_old.lerp(g, 1.0 - beta1)
        v_new = v_old.mul(beta2).addcmul_(g, g, value=1.0 - beta2)
        step_size = _expand((lr / bc1).to(dt), p)
        denom = (v_new.sqrt() / _expand(bc2_sqrt.to(dt), p)).add_(eps)
        p_new = p_dec - step_size * (m_new / denom)
        self._commit(m_old, m_new, active)
        self._commit(v_old, v_new, active)
        self._commit(p, p_new, active)
