"""Exact KNN-Shapley data values (Jia et al., 2019), vectorised.

For one test point ``(x, y)`` and a training set of ``N`` samples sorted by distance to
``x`` (nearest first, ``alpha_1 .. alpha_N``), the utility of a subset ``S`` is the accuracy
of the unweighted ``K``-nearest-neighbour vote on ``y``::

    v(S) = (1 / K) * sum_{k = 1}^{min(K, |S|)} 1[y_{alpha_k(S)} == y]     (v(empty) = 0)

and the Shapley values of this game have the closed recursion (Theorem 1 of the paper)::

    s_{alpha_N} = 1[y_{alpha_N} == y] / N
    s_{alpha_i} = s_{alpha_{i+1}} + (1[y_{alpha_i} == y] - 1[y_{alpha_{i+1}} == y]) / K * min(K, i) / i

We evaluate it for every test point at once as a reversed cumulative sum (no Python loop over
training samples). Distance ties are broken by training index (the lower index is nearer),
the same order a stable sort gives.

Layout: ``(n_test, n_train)``, the one exception to tdabench's ``(n_train, n_test)``
convention. dattri 0.3.0's ``KNNShapleyAttributor.attribute`` returns ``(n_test, n_train)``
(its code and its own test, which indexes ``values[:, train_permutation]``; only its docstring
says ``(n_train, n_test)``). A dattri user who renames the import must get dattri's result, and
a square matrix in the other layout would be silently transposed, so this module follows
dattri's real layout everywhere (``knn_shapley_values`` too, laid out like its distance matrix)
and the class declares it as ``KNNShapleyAttributor.score_layout = "test_train"``: the
pipeline's attribute stage and the benchmark scripts transpose explicitly on that declaration.
``self_attribute`` returns ``(n_train,)`` as everywhere.

Other differences from dattri 0.3.0's ``KNNShapleyAttributor`` (same constructor and
``attribute`` arguments): values are float64 (dattri's are float32); dattri raises
``NotImplementedError`` for a ``task``, we accept one: the embeddings are then the inputs of the
model's last ``nn.Linear`` layer (or of the ``nn.Linear`` named by ``layer_name``) at the task's
first checkpoint, and the distance is Euclidean between those (unless ``distance_func`` is given,
which then receives the embedded batches ``(embeddings, labels)``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from tdabench._validate import check_int
from tdabench.algorithm.arguments import MethodArguments, register_arguments
from tdabench.errors import ConfigError, DataError, ShapeError
from tdabench.func.utils import Batch, batch_size_of, batch_slice, iter_batches
from tdabench.memory import parse_bytes, planner_for

__all__ = ["KNNShapleyArguments", "KNNShapleyAttributor", "default_dist_func", "knn_shapley_values"]

logger = logging.getLogger(__name__)

DistanceFunc = Callable[[Batch, Batch], Tensor]


def _first(batch: Batch) -> Tensor:
    return batch if isinstance(batch, Tensor) else batch[0]


def default_dist_func(batch_x: Batch, batch_y: Batch) -> Tensor:
    """Euclidean distance between the (flattened) first tensors of two batches.

    Args:
        batch_x: a batch whose first element is ``(B_x, ...)``.
        batch_y: a batch whose first element is ``(B_y, ...)``.

    Returns:
        ``(B_x, B_y)`` distances.
    """
    a, b = _first(batch_x), _first(batch_y)
    return torch.cdist(a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double())


def knn_shapley_values(
    dist: Tensor, train_labels: Tensor, test_labels: Tensor, k_neighbors: int
) -> Tensor:
    """Exact KNN-Shapley values of every training sample for every test point.

    Args:
        dist: ``(n_test, n_train)`` distances (smaller = nearer).
        train_labels: ``(n_train,)`` labels.
        test_labels: ``(n_test,)`` labels.
        k_neighbors: ``K`` of the KNN classifier (``>= 1``).

    Returns:
        ``(n_test, n_train)`` float64 Shapley values, laid out like ``dist``; row ``j`` sums
        to ``v(all) =`` the KNN accuracy of the full training set on test point ``j``
        (efficiency).
    """
    if dist.ndim != 2:
        raise ShapeError(f"dist must be (n_test, n_train), got {tuple(dist.shape)}")
    n_test, n = dist.shape
    if train_labels.shape != (n,) or test_labels.shape != (n_test,):
        raise ShapeError(
            f"labels must be (n_train,) = ({n},) and (n_test,) = ({n_test},), "
            f"got {tuple(train_labels.shape)} and {tuple(test_labels.shape)}"
        )
    if not torch.isfinite(dist).all():
        raise DataError(
            "the distance matrix holds NaN or inf; check distance_func and the embeddings"
        )
    order = torch.argsort(dist, dim=1, stable=True)  # nearest first, ties by index
    m = (train_labels.to(dist.device)[order] == test_labels.to(dist.device)[:, None]).to(
        torch.float64
    )
    t = torch.arange(1, n, device=dist.device, dtype=torch.float64)  # ranks 1 .. N-1
    c = torch.clamp(t, max=k_neighbors) / (k_neighbors * t)
    inc = (m[:, :-1] - m[:, 1:]) * c  # (n_test, N-1): s_t - s_{t+1}
    s = (m[:, -1:] / n).expand(n_test, n).clone()
    s[:, :-1] += inc.flip(1).cumsum(1).flip(1)
    return torch.empty_like(s).scatter_(1, order, s)


@register_arguments("KNNShapleyAttributor")
@dataclass
class KNNShapleyArguments(MethodArguments):
    """Declared arguments of :class:`KNNShapleyAttributor` (the pipeline builds it from them).

    Attributes:
        k_neighbors: ``K`` of the KNN classifier (an integer ``>= 1``).
        memory_budget: the planner budget (bytes, ``"8GiB"``, or a fraction), or ``None``.
    """

    k_neighbors: int = 5
    memory_budget: Any = None

    def __post_init__(self) -> None:
        self.k_neighbors = check_int("k_neighbors", self.k_neighbors, 1)
        if self.memory_budget is not None:
            parse_bytes(
                self.memory_budget, total=2**40
            )  # the form only; the device resolves fractions


def _embedding_layer(task: Any, layer_name: str | None) -> torch.nn.Module:
    from tdabench.task import AttributionTask

    if not isinstance(task, AttributionTask):
        raise ConfigError(f"task must be an AttributionTask or None, got {type(task).__name__}")
    linears = {n: m for n, m in task.model.named_modules() if isinstance(m, torch.nn.Linear)}
    if layer_name is None:
        if not linears:
            raise ConfigError(
                "the task's model has no nn.Linear layer to embed with; pass task=None and embeddings as inputs"
            )
        return list(linears.values())[-1]
    if layer_name not in linears:
        raise ConfigError(
            f"layer_name {layer_name!r} is not an nn.Linear module of the model; linear layers: {list(linears)}"
        )
    return linears[layer_name]


def _labels(given: Sequence[Any] | Tensor | None, batches: list[Batch], what: str) -> Tensor:
    n = sum(batch_size_of(b) for b in batches)
    if given is None:
        if any(isinstance(b, Tensor) or len(b) < 2 for b in batches):
            raise DataError(
                f"the {what} batches carry no labels; pass {what}_labels or yield (inputs, ..., labels)"
            )
        return torch.cat([torch.as_tensor(b[-1]).reshape(-1) for b in batches])
    lab = torch.as_tensor(given).reshape(-1)
    if lab.numel() != n:
        raise ShapeError(
            f"{what}_labels has {lab.numel()} entries but the {what} loader holds {n} samples"
        )
    return lab


class KNNShapleyAttributor:
    """Exact KNN-Shapley values of training samples for test points (Jia et al., 2019).

    ``attribute`` returns ``(n_test, n_train)``, dattri 0.3.0's actual layout (the one
    exception to tdabench's ``(n_train, n_test)``; declared by ``score_layout``): transpose
    it for the tdabench layout, ``attribute(train, test).T``.

    Args:
        k_neighbors: ``K`` of the KNN classifier whose accuracy is the utility.
        task: ``None`` (dattri's only option: the batches' first tensors are the embeddings),
            or an :class:`~tdabench.task.AttributionTask` whose model embeds the inputs (the
            input of its last ``nn.Linear``, or of ``layer_name``).
        distance_func: ``f(test_batch, train_batch) -> (B_test, B_train)`` distances; by
            default the Euclidean distance between the flattened first tensors of the batches.
        layer_name: with a task, the ``nn.Linear`` module whose input is the embedding.
        device: where distances and values are computed.
        memory_budget: the planner budget (bytes, ``"8GiB"``, or a fraction).
    """

    requires_cache = False
    #: ``attribute`` returns ``(n_test, n_train)`` (dattri's layout); every other attributor
    #: returns ``(n_train, n_test)``. Generic callers transpose on this declaration.
    score_layout: ClassVar[str] = "test_train"

    def __init__(
        self,
        k_neighbors: int,
        task: Any = None,
        distance_func: DistanceFunc | None = None,
        *,
        layer_name: str | None = None,
        device: str | torch.device = "cpu",
        memory_budget: int | float | str | None = None,
    ) -> None:
        self.args = KNNShapleyArguments(k_neighbors=k_neighbors, memory_budget=memory_budget)
        self.k_neighbors = k_neighbors
        self.task = task
        self._layer: torch.nn.Module | None = None
        if task is not None:
            self._layer = _embedding_layer(task, layer_name)
        elif layer_name is not None:
            raise ConfigError(
                "layer_name selects the embedding layer of a task's model; pass a task or drop layer_name"
            )
        self.layer_name = layer_name
        self.distance_func = distance_func if distance_func is not None else default_dist_func
        self.device = torch.device(device)
        self.memory_budget = memory_budget

    def cache(self, full_train_loader: Iterable[Batch] | None = None) -> None:
        """Nothing to precompute (kept for the common attributor surface)."""

    @torch.no_grad()
    def _embed(self, batches: list[Batch]) -> list[Batch]:
        """With a task: ``(embedding (B, h), labels)`` per batch, the input of the embedding layer."""
        if self._layer is None:
            return batches
        model = self.task.model
        self.task.get_params(0)  # the model holds checkpoint 0
        seen: list[Tensor] = []
        handle = self._layer.register_forward_hook(
            lambda _m, inp, _out: seen.append(inp[0].detach())
        )
        was = model.training
        model.eval()
        out = []
        try:
            for b in batches:
                seen.clear()
                model(*[t.to(next(model.parameters()).device) for t in b[:-1]])
                out.append((seen[0].reshape(seen[0].shape[0], -1).to(self.device), b[-1]))
        finally:
            handle.remove()
            model.train(was)
        return out

    def _distances(self, test_batch: Batch, train: list[Batch]) -> Tensor:
        rows = [
            torch.as_tensor(self.distance_func(test_batch, tb)).to(self.device, torch.float64)
            for tb in train
        ]
        d = torch.cat(rows, dim=1)
        b = batch_size_of(test_batch)
        n = sum(batch_size_of(tb) for tb in train)
        if d.shape != (b, n):
            raise ShapeError(
                f"distance_func must return (B_test, B_train); got {tuple(d.shape)} for ({b}, {n}) in all"
            )
        return d

    def attribute(
        self,
        train_dataloader: Iterable[Batch],
        test_dataloader: Iterable[Batch],
        train_labels: Sequence[Any] | Tensor | None = None,
        test_labels: Sequence[Any] | Tensor | None = None,
    ) -> Tensor:
        """KNN-Shapley values of every training sample for every test sample.

        Args:
            train_dataloader: the training samples (not shuffled); labels are each batch's
                last element unless ``train_labels`` is given.
            test_dataloader: the test samples (not shuffled).
            train_labels: ``(n_train,)`` labels in loader order, optional.
            test_labels: ``(n_test,)`` labels in loader order, optional.

        Returns:
            ``(n_test, n_train)`` float64 values, dattri's layout (higher = the training
            sample helps the KNN predict the test label); ``.T`` gives tdabench's
            ``(n_train, n_test)``.
        """
        train = list(iter_batches(train_dataloader, "train loader"))
        test = list(iter_batches(test_dataloader, "test loader"))
        y_train = _labels(train_labels, train, "train")
        y_test = _labels(test_labels, test, "test")
        train, test = self._embed(train), self._embed(test)
        return torch.cat([v for _, v in self._pieces(train, test, y_train, y_test)])

    def _pieces(
        self, train: list[Batch], test: list[Batch], y_train: Tensor, y_test: Tensor
    ) -> Iterator[tuple[int, Tensor]]:
        """``(first test index, (b, n_train) values)`` for pieces of test rows sized by the planner."""
        # a piece of test rows holds distances, the sort order and a few float64 temporaries
        rows = planner_for(self.device, self.memory_budget).rows(
            y_train.numel() * 8 * 6, stream=True
        )
        start = 0
        for tb in test:
            b = batch_size_of(tb)
            for a in range(0, b, rows):
                piece = tb if b <= rows else batch_slice(tb, a, min(b, a + rows))
                d = self._distances(piece, train)
                lab = y_test[start + a : start + a + d.shape[0]]
                yield start + a, knn_shapley_values(d, y_train, lab, self.k_neighbors)
            start += b

    def self_attribute(
        self, train_dataloader: Iterable[Batch], train_labels: Sequence[Any] | Tensor | None = None
    ) -> Tensor:
        """The diagonal of ``attribute(train, train)``: each sample's value for predicting itself.

        A sample is its own nearest neighbour, so its value is large when the neighbours that
        follow disagree with its label: a mislabelled sample scores high.

        Returns:
            ``(n_train,)`` float64.
        """
        train = list(iter_batches(train_dataloader, "train loader"))
        y = _labels(train_labels, train, "train")
        train = self._embed(train)
        out = torch.empty(y.numel(), dtype=torch.float64, device=self.device)
        for a, v in self._pieces(train, train, y, y):
            rows = torch.arange(v.shape[0], device=v.device)
            out[a : a + v.shape[0]] = v[rows, rows + a]
        return out

    def hyperparameters(self) -> dict[str, Any]:
        """Resolved hyper-parameters, for provenance metadata."""
        return {
            "method": type(self).__name__,
            **self.args.to_dict(),
            "layer_name": self.layer_name,
            "embedding": "inputs"
            if self.task is None
            else "last nn.Linear input"
            if self.layer_name is None
            else f"{self.layer_name} input",
            "distance_func": getattr(self.distance_func, "__name__", "custom"),
        }

    def __repr__(self) -> str:
        return f"KNNShapleyAttributor(k_neighbors={self.k_neighbors}, device={str(self.device)!r})"
