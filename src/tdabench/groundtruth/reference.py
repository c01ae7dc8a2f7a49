"""Reference models: the trained models that attributors explain (one call, notebook-friendly).

:func:`train_reference_models` trains ``ensemble`` models on the clean labels (TRAK ensembles
use them all) and, optionally, one model on noisy labels (mislabel detection), with
``checkpoints`` evenly spaced snapshots of model 0's run (TracIn) taken by the trainer's
``on_epoch`` callback: one training run per model. Every state is checked before it is handed
over: a diverged model (NaN, inf or weights beyond :data:`MAX_ABS_WEIGHT`) raises
:class:`~tdabench.errors.NonFiniteError` naming the model and the fix, so nothing of a diverged
run is ever saved.

Example::

    from tdabench.benchmark import get_setting
    from tdabench.groundtruth.reference import train_reference_models

    setting = get_setting("mnist_lr_smoke")
    data = setting.load()
    ref = train_reference_models(setting, data, ensemble=2, checkpoints=3)
    ref.states["clean"][0][-1]     # final state dict of clean model 0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tdabench.errors import ConfigError, NonFiniteError

__all__ = ["MAX_ABS_WEIGHT", "ReferenceModels", "check_weights", "train_reference_models"]

#: Largest parameter magnitude a trained model may have: beyond it the training diverged (a
#: learning rate of 1e30 gives weights around 1e29 that are still finite).
MAX_ABS_WEIGHT = 1e6

#: ``on_checkpoint(variant, model, index, state, epoch)``: called for every snapshot.
CheckpointCallback = Callable[[str, int, int, dict[str, Tensor], int], None]


@dataclass
class ReferenceModels:
    """What :func:`train_reference_models` made.

    Attributes:
        epochs: the epoch after which each checkpoint was taken (the last is the end).
        seeds: the seed of each clean model.
        states: ``{variant: [[state dict per checkpoint] per model]}``; model 0 holds
            ``len(epochs)`` checkpoints, the others their final state only. Empty when an
            ``on_checkpoint`` callback consumed the states instead.
    """

    epochs: list[int]
    seeds: list[int]
    states: dict[str, list[list[dict[str, Tensor]]]] = field(default_factory=dict)


def check_weights(state: Mapping[str, Tensor], what: str) -> None:
    """Refuse a diverged model: NaN/inf or a parameter beyond :data:`MAX_ABS_WEIGHT`.

    Args:
        state: a state dict ``{name: tensor}`` (non-floating and empty tensors are skipped).
        what: the model, as the message names it.

    Raises:
        NonFiniteError: naming ``what``, the offending tensor and the fix.
    """
    for name, t in state.items():
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(
                f"{what}: training diverged ({name} has NaN/inf values); lower the learning "
                "rate (recipe.lr) or add gradient clipping (recipe.grad_clip). Nothing was saved"
            )
        peak = float(t.detach().abs().max())
        if peak > MAX_ABS_WEIGHT:
            raise NonFiniteError(
                f"{what}: training diverged ({name} reaches |w| = {peak:.3g} > {MAX_ABS_WEIGHT:g}); "
                "lower the learning rate (recipe.lr) or add gradient clipping. Nothing was saved"
            )


def _checkpoint_epochs(trainer: Any, n_train: int, checkpoints: int) -> list[int]:
    """Epochs after which to snapshot: evenly spaced over the epochs the stream actually runs."""
    probe_masks = torch.ones(1, n_train, dtype=torch.bool)
    b_stream = trainer.stream_batch_size(probe_masks)
    epochs = math.ceil(trainer.num_iters(b_stream) / math.ceil(n_train / b_stream))
    return sorted({max(1, round(epochs * (j + 1) / checkpoints)) for j in range(checkpoints)})


def _train_variant(
    setting: Any,
    data: Any,
    variant: str,
    m: int,
    seeds: Sequence[int],
    stops: list[int],
    emit: CheckpointCallback,
    device: str,
) -> None:
    from tdabench.groundtruth.trainer import make_trainer, unstack

    want = {stop: j for j, stop in enumerate(stops)}
    taken: list[int] = []

    def snapshot(epoch: int, rows: list[int], stacked: dict[str, Any]) -> None:
        # intermediate checkpoints (TracIn) of model 0 only, taken during its one run
        if 0 in rows and epoch in want and want[epoch] < len(stops) - 1:
            emit(variant, 0, want[epoch], unstack(stacked, rows.index(0)), epoch)
            taken.append(epoch)

    masks = torch.ones(m, len(data.train[1]), dtype=torch.bool)
    trainer = make_trainer(setting, data, batched=True, device=device)
    stacked = trainer.train(masks, list(seeds[:m]), on_epoch=snapshot)
    if len(taken) != len(stops) - 1:
        raise ConfigError(
            f"the trainer reported epochs missing some of the checkpoint epochs {stops[:-1]} "
            "(recipe with max_iters?); set train.checkpoints: 1 or use an epoch-based recipe"
        )
    for k in range(m):
        emit(variant, k, len(stops) - 1, unstack(stacked, k), stops[-1])


# Alike in shape only (a typed keyword signature) to engine.verify and render_slurm_profile
def train_reference_models(
    setting: Any,
    data: Any,
    *,
    ensemble: int = 1,
    checkpoints: int = 1,
    seed: int = 0,
    noisy_labels: Tensor | None = None,
    device: str = "cpu",
    on_checkpoint: CheckpointCallback | None = None,
) -> ReferenceModels:
    """Train the reference models of a benchmark setting.

    Args:
        setting: a :class:`~tdabench.benchmark.BenchmarkSetting`.
        data: its loaded :class:`~tdabench.benchmark.BenchmarkData`.
        ensemble: clean models (independent seeds ``seed * 1000 + k``).
        checkpoints: snapshots of model 0 (the last is the final state).
        seed: base seed.
        noisy_labels: ``(n_train,)`` labels of the noisy variant (one model), or ``None``.
        device: torch device of the training.
        on_checkpoint: receives each checked state instead of keeping it in memory.

    Returns:
        :class:`ReferenceModels`.

    Raises:
        NonFiniteError: a model diverged (nothing of it is handed over).
        ConfigError: invalid counts, or checkpoints a ``max_iters`` recipe cannot give.
    """
    from tdabench.groundtruth.trainer import make_trainer

    if ensemble < 1 or checkpoints < 1:
        raise ConfigError(f"ensemble ({ensemble}) and checkpoints ({checkpoints}) must be >= 1")
    n_train = len(data.train[1])
    seeds = [seed * 1000 + k for k in range(ensemble)]
    stops = _checkpoint_epochs(
        make_trainer(setting, data, batched=True, device="cpu"), n_train, checkpoints
    )
    result = ReferenceModels(epochs=stops, seeds=seeds)

    def emit(variant: str, k: int, j: int, state: dict[str, Tensor], epoch: int) -> None:
        check_weights(state, f"reference model {variant}-{k} (checkpoint {j}, epoch {epoch})")
        if on_checkpoint is not None:
            on_checkpoint(variant, k, j, state, epoch)
            return
        per_model = result.states.setdefault(variant, [])
        while len(per_model) <= k:
            per_model.append([])
        per_model[k].append(state)

    _train_variant(setting, data, "clean", ensemble, seeds, stops, emit, device)
    if noisy_labels is not None:
        noisy = type(data)(
            train=(data.train[0], noisy_labels, *data.train[2:]), test=data.test, meta=data.meta
        )
        _train_variant(setting, noisy, "noisy", 1, seeds, stops, emit, device)
    return result
