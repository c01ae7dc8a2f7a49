"""Brittleness: the fewest top-attributed training samples whose removal flips a test prediction.

For one test sample ``(x, y)`` and its attribution scores over the training set, the
training samples are ranked by score, highest first (ties: lower training index first). For
each ``k`` of an ascending search space, a model is retrained without the top ``k`` samples;
the brittleness is the first ``k`` whose model predicts a label other than ``y`` (``None``
if none does). A better attribution method finds the samples that support a prediction, so
its brittleness is smaller. ``k = 0`` (the full training set) is in the default search space:
a test sample the full model already gets wrong has brittleness 0, so evaluate test samples
the full model classifies correctly.

Two entry points:

* :func:`brittleness` -- dattri 0.3.0's signature: user ``train_func`` / ``eval_func``, one
  test sample, models trained one at a time in search-space order (stops at the first flip).
* :class:`BrittlenessRunner` -- the library-level runner for a benchmark: every
  ``(test sample, k)`` model of a shard is trained in one call of a batched trainer
  (:mod:`tdabench.groundtruth.trainer`), the predictions are written as atomic, checksummed
  Parquet shards under a content key (trainer fingerprint, score digest, test indices,
  search space, seed), and a rerun trains only the missing shards (same conventions as the
  ground-truth store: :func:`tdabench.groundtruth.store.write_table` /
  :func:`~tdabench.groundtruth.store.read_table_checked`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from tdabench.errors import ConfigError, KeyMismatchError, NonFiniteError, ShapeError, StoreError

__all__ = ["BrittlenessRunner", "brittleness", "removal_order"]

logger = logging.getLogger(__name__)

DEFAULT_SEARCH_SPACE = tuple(range(0, 200, 20))


def removal_order(scores: Tensor | np.ndarray) -> np.ndarray:
    """Training positions by descending score, ties by ascending position.

    Args:
        scores: ``(n_train,)`` finite scores of one test sample.

    Returns:
        ``(n_train,)`` int64 positions.
    """
    s = np.asarray(
        scores.detach().cpu().numpy() if isinstance(scores, Tensor) else scores, dtype=np.float64
    ).reshape(-1)
    if not np.all(np.isfinite(s)):
        raise NonFiniteError(
            f"{int((~np.isfinite(s)).sum())} scores are NaN or inf; fix the attributor before ranking"
        )
    return np.lexsort((np.arange(s.size), -s)).astype(np.int64)


def _search_space(search_space: Iterable[int] | None, n_train: int) -> list[int]:
    ks = (
        [k for k in DEFAULT_SEARCH_SPACE if k <= n_train]
        if search_space is None
        else list(search_space)
    )
    if not ks:
        raise ConfigError(
            "search_space is empty; pass ascending integers such as range(0, 200, 20)"
        )
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n_train:
            raise ConfigError(
                f"search_space values must be integers in [0, n_train={n_train}], got {k!r}"
            )
    if any(b <= a for a, b in itertools.pairwise(ks)):
        raise ConfigError(
            f"search_space must be strictly ascending, got {ks}; the first flipping k is the answer"
        )
    return [int(k) for k in ks]


def _one_column(scores: Any, n_train: int) -> Tensor:
    s = torch.as_tensor(scores).detach().cpu()
    if s.dim() == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.dim() != 1 or s.shape[0] != n_train:
        raise ShapeError(
            f"scores must be (n_train,) = ({n_train},) or ({n_train}, 1) for the one test sample, got {tuple(s.shape)}; "
            "call brittleness once per test sample (or use BrittlenessRunner for many)"
        )
    return s


def _train_positions(train_loader: DataLoader) -> list[int]:
    """Dataset index of each training position (the loader's sampler order)."""
    sampler = getattr(train_loader, "sampler", None)
    if sampler is not None and hasattr(sampler, "indices"):
        return [int(i) for i in sampler.indices]
    return list(range(len(train_loader.dataset)))


def brittleness(
    train_loader: DataLoader,
    test_loader: DataLoader,
    scores: Tensor,
    train_func: Callable[[DataLoader], torch.nn.Module],
    eval_func: Callable[[torch.nn.Module, DataLoader], Tensor],
    device: str | torch.device = "cpu",
    search_space: Sequence[int] | None = None,
) -> int | None:
    """Smallest ``k`` in ``search_space`` whose top-``k`` removal flips the test prediction.

    Args:
        train_loader: the training loader; position ``i`` of ``scores`` is its ``i``-th
            sample (with a sampler that has ``.indices``, e.g. dattri's ``SubsetSampler``,
            that is dataset index ``sampler.indices[i]``).
        test_loader: a loader holding exactly one test sample ``(x, label)``.
        scores: ``(n_train,)`` (or ``(n_train, 1)``) attribution scores of that sample.
        train_func: ``train_func(loader) -> model``, trains on the loader it is given (a
            ``DataLoader`` over the remaining samples in ascending dataset-index order, with
            the original batch size).
        eval_func: ``eval_func(model, test_loader) -> prediction`` (one label).
        device: where the model is evaluated.
        search_space: strictly ascending ``k`` values in ``[0, n_train]`` (default
            ``0, 20, ..., 180``, those up to ``n_train``).

    Returns:
        The first ``k`` whose retrained model predicts a label other than the test label,
        or ``None`` if none in the search space does.
    """
    positions = _train_positions(train_loader)
    s = _one_column(scores, len(positions))
    ks = _search_space(search_space, len(positions))
    test = [b for b in test_loader]
    if len(test) != 1 or int(torch.as_tensor(test[0][-1]).numel()) != 1:
        raise ShapeError(
            "test_loader must hold exactly one test sample; call brittleness once per test sample"
        )
    label = torch.as_tensor(test[0][-1]).reshape(()).item()
    order = removal_order(s)
    for k in ks:
        removed = {positions[i] for i in order[:k]}
        remaining = sorted(i for i in positions if i not in removed)
        loader = DataLoader(
            train_loader.dataset, batch_size=train_loader.batch_size, sampler=remaining
        )
        model = train_func(loader).to(device)
        model.eval()
        with torch.no_grad():
            pred = torch.as_tensor(eval_func(model, test_loader)).reshape(-1)
        if pred.numel() != 1:
            raise ShapeError(
                f"eval_func must return one prediction for the one test sample, got {pred.numel()}"
            )
        logger.debug("brittleness: k=%d prediction %s (label %s)", k, pred.item(), label)
        if pred.item() != label:
            return k
    return None


# ------------------------------------------------------------------------------------ runner
def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


@dataclass
class BrittlenessRunner:
    """Batched, resumable brittleness for many test samples (see the module docstring).

    Attributes:
        trainer: a trainer with ``fingerprint()``, ``train(masks, seeds)``, ``n_train`` and
            ``evaluate(stacked, target)`` (a :func:`tdabench.groundtruth.trainer.make_trainer`).
        predict: ``f(state_dict, batch_of_one) -> 1.0 if the model's prediction equals the label
            else 0.0``, passed to ``trainer.evaluate`` as a callable target.
        store_dir: where the shards go (one directory per key; reuse with another key raises).
        search_space: strictly ascending ``k`` values.
        seed: the model seed, shared by every model (like LOO models) so that two models differ
            only by the removed samples.
        shard_size: test samples per shard; a shard holds the models of one ``k`` for up to
            ``shard_size`` test samples (one ``trainer.train`` call, equal subset sizes).
    """

    trainer: Any
    predict: Callable[[dict[str, Tensor], tuple[Tensor, ...]], Tensor]
    store_dir: str | os.PathLike
    search_space: Sequence[int] = DEFAULT_SEARCH_SPACE
    seed: int = 0
    shard_size: int = 20
    _ks: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._ks = _search_space(self.search_space, int(self.trainer.n_train))
        if (
            isinstance(self.shard_size, bool)
            or not isinstance(self.shard_size, int)
            or self.shard_size < 1
        ):
            raise ConfigError(f"shard_size must be an integer >= 1, got {self.shard_size!r}")

    def key(self, scores: np.ndarray, test_indices: Sequence[int]) -> tuple[str, dict[str, Any]]:
        """Content key of a run and the configuration it hashes."""
        from tdabench.groundtruth.key import canonical_json

        config = {
            "kind": "brittleness",
            "trainer": self.trainer.fingerprint(),
            "scores_sha256": _digest(scores.astype(np.float64)),
            "test_indices": [int(j) for j in test_indices],
            "search_space": self._ks,
            "seed": int(self.seed),
            "shard_size": int(self.shard_size),
        }
        return hashlib.sha256(canonical_json(config).encode()).hexdigest(), config

    def _open(self, key: str, config: dict[str, Any]) -> Path:
        from tdabench.groundtruth.store import atomic_write_bytes

        d = Path(self.store_dir)
        manifest = d / "manifest.json"
        if manifest.is_file():
            found = json.loads(manifest.read_text()).get("key")
            if found != key:
                raise KeyMismatchError(
                    f"{d} holds brittleness results of key {found}, not {key} (other scores, test points, search space "
                    "or trainer); use another directory"
                )
        else:
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(
                manifest, json.dumps({"key": key, "config": config}, indent=1).encode()
            )
        (d / "shards").mkdir(exist_ok=True)
        return d

    def _run_shard(
        self,
        path: Path,
        key: str,
        entries: list[tuple[int, int]],
        orders: np.ndarray,
        cols: list[int],
    ) -> None:
        import pyarrow as pa

        from tdabench.groundtruth.store import write_table

        n = int(self.trainer.n_train)
        masks = torch.ones(len(entries), n, dtype=torch.bool)
        for r, (jp, kp) in enumerate(entries):
            masks[r, torch.from_numpy(orders[jp][: self._ks[kp]])] = False
        stacked = self.trainer.train(masks, [int(self.seed)] * len(entries))
        correct = self.trainer.evaluate(stacked, self.predict)  # (m, n_test)
        vals = [float(correct[r, cols[jp]]) for r, (jp, _) in enumerate(entries)]
        table = pa.table(
            {
                "test_pos": pa.array([e[0] for e in entries], pa.int64()),
                "k": pa.array([self._ks[e[1]] for e in entries], pa.int64()),
                "correct": pa.array(vals, pa.float64()),
            }
        )
        write_table(path, table, {"key": key, "config": json.dumps({"entries": len(entries)})})

    def _shard_table(
        self,
        path: Path,
        key: str,
        chunk: list[tuple[int, int]],
        orders: np.ndarray,
        cols: list[int],
    ) -> Any:
        """The stored table of one shard, (re)computed when missing, damaged or incomplete."""
        from tdabench.groundtruth.store import read_table_checked

        table = None
        if path.is_file():
            try:
                table, _ = read_table_checked(path, key)
            except (StoreError, ConfigError, OSError) as exc:
                logger.warning("brittleness shard %s is damaged (%s); recomputing it", path, exc)
                table = None
        if table is None or table.num_rows != len(chunk):
            self._run_shard(path, key, chunk, orders, cols)
            table, _ = read_table_checked(path, key)
        return table

    def run(self, scores: Tensor | np.ndarray, test_indices: Sequence[int]) -> dict[str, Any]:
        """Brittleness of each test sample (trains only the shards not already stored).

        Args:
            scores: ``(n_train, len(test_indices))`` scores; column ``c`` is test sample
                ``test_indices[c]`` of the trainer's test set.
            test_indices: positions in the trainer's test set.

        Returns:
            ``{"brittleness": [k or None per test sample], "correct": (n_test_sel, n_k)
            list of 0/1 predictions-correct, "search_space": [...], "key": ...}``.
        """

        s = np.asarray(
            scores.detach().cpu().numpy() if isinstance(scores, Tensor) else scores,
            dtype=np.float64,
        )
        cols = [int(j) for j in test_indices]
        if s.ndim != 2 or s.shape != (int(self.trainer.n_train), len(cols)):
            raise ShapeError(
                f"scores must be (n_train, len(test_indices)) = ({self.trainer.n_train}, {len(cols)}), got {s.shape}"
            )
        orders = np.stack([removal_order(s[:, c]) for c in range(len(cols))])
        key, config = self.key(s, cols)
        d = self._open(key, config)
        # one k per shard: every model of a trainer call has the same subset size (the batched
        # trainer's scaled minibatch stream needs that), test samples chunked by shard_size
        shards = [
            [(jp, kp) for jp in range(a, min(len(cols), a + self.shard_size))]
            for kp in range(len(self._ks))
            for a in range(0, len(cols), self.shard_size)
        ]
        correct = np.full((len(cols), len(self._ks)), np.nan)
        for sid, chunk in enumerate(shards):
            path = d / "shards" / f"shard-{sid:05d}.parquet"
            table = self._shard_table(path, key, chunk, orders, cols)
            ks = {k: i for i, k in enumerate(self._ks)}
            for jp, k, c in zip(
                *(table.column(n).to_pylist() for n in ("test_pos", "k", "correct")), strict=True
            ):
                correct[jp, ks[k]] = c
        brit = [
            next((self._ks[i] for i in range(len(self._ks)) if row[i] < 0.5), None)
            for row in correct
        ]
        return {
            "brittleness": brit,
            "correct": correct.tolist(),
            "search_space": self._ks,
            "key": key,
            "store": str(d),
        }
