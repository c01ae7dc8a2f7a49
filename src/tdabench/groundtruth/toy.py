"""A tiny, exactly reproducible trainer for tests, examples and the kill/resume benchmark.

:class:`ToySoftmaxTrainer` implements the ``Trainer`` protocol for multinomial logistic
regression in float64 with minibatch SGD. Every model is trained on its own in a plain
loop, from a ``torch.Generator`` seeded with its seed (initialisation and shuffling), so
its result is bitwise independent of which other models are trained in the same call.
It is *not* a benchmark trainer (see ``tdabench.groundtruth.trainer`` for those).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tdabench.errors import ConfigError, ShapeError

__all__ = ["ToySoftmaxTrainer", "make_toy_data", "tensor_fingerprint"]


def tensor_fingerprint(*tensors: Tensor) -> str:
    """sha256 of the dtypes, shapes and bytes of ``tensors``."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_toy_data(
    n_train: int = 60,
    n_test: int = 8,
    dim: int = 5,
    num_classes: int = 3,
    seed: int = 0,
    noise: float = 1.0,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Gaussian class blobs: ``((x_train, y_train), (x_test, y_test))``, float64 / int64."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(num_classes, dim, generator=g, dtype=torch.float64)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = centers[y] + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
        return x, y

    return draw(n_train), draw(n_test)


class ToySoftmaxTrainer:
    """Softmax regression trained with minibatch SGD, one model at a time.

    Args:
        train: ``(x (n_train, d), y (n_train,))``.
        test: ``(x (n_test, d), y (n_test,))``.
        num_classes: number of classes.
        lr: SGD step size.
        epochs: passes over each model's subset.
        batch_size: minibatch size (the last batch of an epoch may be smaller).
        weight_decay: L2 penalty ``weight_decay / 2 * ||W||^2`` added to the mean loss.
        delay: seconds to sleep per trained model (to make fault tests hit mid-shard).
    """

    def __init__(
        self,
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
        num_classes: int,
        lr: float = 0.5,
        epochs: int = 5,
        batch_size: int = 16,
        weight_decay: float = 1e-2,
        delay: float = 0.0,
    ) -> None:
        self.x, self.y = train[0].to(torch.float64), train[1].long()
        self.xt, self.yt = test[0].to(torch.float64), test[1].long()
        if self.x.dim() != 2 or self.y.shape != (self.x.shape[0],):
            raise ShapeError("train must be (x (n, d), y (n,))")
        self.num_classes = int(num_classes)
        self.lr, self.epochs, self.batch_size = float(lr), int(epochs), int(batch_size)
        self.weight_decay, self.delay = float(weight_decay), float(delay)
        self.n_train, self.n_test = self.x.shape[0], self.xt.shape[0]

    def fingerprint(self) -> dict[str, Any]:
        return {
            "name": "toy-softmax",
            "version": 1,
            "recipe": {
                "lr": self.lr,
                "epochs": self.epochs,
                "batch_size": self.batch_size,
                "weight_decay": self.weight_decay,
            },
            "num_classes": self.num_classes,
            "data": tensor_fingerprint(self.x, self.y, self.xt, self.yt),
        }

    def _train_one(self, mask: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(int(seed))
        d, c = self.x.shape[1], self.num_classes
        w = 0.01 * torch.randn(c, d, generator=g, dtype=torch.float64)
        b = torch.zeros(c, dtype=torch.float64)
        idx = mask.nonzero().flatten()
        for _ in range(self.epochs):
            perm = idx[torch.randperm(idx.numel(), generator=g)]
            for start in range(0, perm.numel(), self.batch_size):
                bi = perm[start : start + self.batch_size]
                xb, yb = self.x[bi], self.y[bi]
                p = torch.softmax(xb @ w.T + b, dim=1)
                p[torch.arange(bi.numel()), yb] -= 1.0
                p /= bi.numel()
                w = w - self.lr * (p.T @ xb + self.weight_decay * w)
                b = b - self.lr * p.sum(dim=0)
        if self.delay:
            time.sleep(self.delay)
        return w, b

    def train(self, masks: Tensor, seeds: Sequence[int]) -> dict[str, Tensor]:
        """Train one model per row of ``masks`` (bool ``(m, n_train)``); stacked weights."""
        if masks.dtype != torch.bool or masks.dim() != 2 or masks.shape[1] != self.n_train:
            raise ShapeError(
                f"masks must be bool (m, n_train={self.n_train}), got {masks.dtype} {tuple(masks.shape)}"
            )
        if len(seeds) != masks.shape[0]:
            raise ConfigError(f"got {len(seeds)} seeds for {masks.shape[0]} masks")
        ws, bs = zip(
            *(self._train_one(m, s) for m, s in zip(masks, seeds, strict=True)), strict=True
        )
        return {"weight": torch.stack(ws), "bias": torch.stack(bs)}

    def evaluate(
        self, stacked: Mapping[str, Tensor], target: str | Callable[..., Tensor]
    ) -> Tensor:
        """``(m, n_test)`` per-test-sample target: ``"loss"`` (cross-entropy), ``"neg_loss"``,
        ``"margin"`` (true logit minus logsumexp of the others) or ``f(params, (x, y))``."""
        w, b = stacked["weight"], stacked["bias"]
        if callable(target):
            return torch.stack(
                [
                    target({"weight": w[i], "bias": b[i]}, (self.xt, self.yt))
                    for i in range(w.shape[0])
                ]
            )
        # One model at a time, so each row is bitwise independent of the others.
        logits = torch.stack([self.xt @ w[i].T + b[i] for i in range(w.shape[0])])  # (m, n_test, c)
        true = logits.gather(2, self.yt[None, :, None].expand(w.shape[0], -1, 1)).squeeze(2)
        if target in ("loss", "neg_loss"):
            loss = torch.logsumexp(logits, dim=2) - true
            return loss if target == "loss" else -loss
        if target == "margin":
            others = logits.scatter(
                2, self.yt[None, :, None].expand(w.shape[0], -1, 1), float("-inf")
            )
            return true - torch.logsumexp(others, dim=2)
        raise ConfigError(
            f"unknown target {target!r}; use 'loss', 'neg_loss', 'margin' or a callable"
        )
