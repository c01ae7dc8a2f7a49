"""K-FAC and EK-FAC curvature: Kronecker-factored Fisher blocks per ``nn.Linear``/``nn.Conv2d`` layer.

For a layer with (bias-augmented) weight matrix ``W̃`` ``(d_out, d_in')`` the per-sample
gradient is ``G_i = Σ_t g_{i,t} a_{i,t}ᵀ`` (see :mod:`tdabench.func.capture`). The Fisher block
of the layer (row-major ``vec``) is ``F = (1/N) Σ_i vec(G_i) vec(G_i)ᵀ`` and K-FAC approximates it
by ``S ⊗ A`` with

* ``A = Σ_{i,t} a_{i,t} a_{i,t}ᵀ / Σ_i T_i``  (activation covariance, per position), ``(d_in', d_in')``;
* ``S = Σ_{i,t} g_{i,t} g_{i,t}ᵀ / N``          (output-gradient covariance, per sample), ``(d_out, d_out)``.

For inputs without positions (``T = 1``) this is the usual ``E[a aᵀ] ⊗ E[g gᵀ]``; for sequences and
convolutions it is the "expand" convention (``A`` averaged over positions, ``S`` summed). With the
eigendecompositions ``A = Q_A diag(λ_A) Q_Aᵀ`` and ``S = Q_S diag(λ_S) Q_Sᵀ``, the block is
``(Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ`` with

* K-FAC: ``Λ[o, i] = λ_S[o] λ_A[i]``;
* EK-FAC: ``Λ[o, i] = (1/N) Σ_n (Q_Sᵀ G_n Q_A)[o, i]²``, the exact diagonal of ``F`` in that
  Kronecker eigenbasis (George et al., 2018).

So ``F⁻¹ V = Q_S ((Q_Sᵀ V Q_A) / (Λ + λ)) Q_Aᵀ`` for a gradient matrix ``V``. The damping ``λ`` of a
layer is ``damping + damping_factor · mean(Λ)``: an explicit value, a fraction of the layer's mean
eigenvalue (kronfluence's heuristic is ``0.1 · mean``; one fraction for every layer, or one per
module name), or both.

**Which gradients** (``fisher=``): ``"empirical"`` uses each training sample's own loss gradient
(the task's ``loss_func`` on its labels: the empirical Fisher, as dattri 0.3.0); ``"true"`` replaces
the labels by labels sampled from the model's predicted distribution (the Fisher of the model's
own distribution, an unbiased estimate of the Gauss-Newton matrix for softmax cross-entropy, as
kronfluence does). ``"true"`` assumes classification batches ``(inputs, labels, ...)``, a model whose
output ``model(inputs)`` is the logits ``(B, C)`` or ``(B, T, C)``, and a ``loss_func`` that is the
cross-entropy of those logits with the labels; labels are drawn with a generator seeded from
``seed``, the batch index and the pass (the eigenvalue correction draws labels independent of
those of the covariances, as kronfluence does), so a fit is reproducible. ``"ggn"`` takes the expectation over the
labels exactly instead of sampling one: every sample is evaluated with each of the ``C`` labels,
weighted by the model's probability of it, so ``S = (1/N) Σ_i Σ_c p_ic g_ic g_icᵀ`` and EK-FAC's
``Λ`` likewise; for softmax cross-entropy that is the Kronecker-factored Gauss-Newton matrix, at
``C`` backward passes per sample. It needs logits ``(B, C)`` (one label per sample) and layers with
one position per sample.

**Storage.** With a ``factor_dir``, factors are fitted in ``num_partitions`` contiguous groups of
batches; each partition's sums are written (safetensors, atomically) when complete and reused by
a rerun, so an interrupted fit resumes. The directory is bound to a provenance key: the sha256 of
the format version, strategy, Fisher kind and seed, the module names and shapes, a digest of every
model parameter and buffer, and a fingerprint of the data (sha256 of each tensor position's bytes
in loader order, shapes and dtypes). Reopening it with a different key raises
:class:`~tdabench.errors.KeyMismatchError` that names the differing fields.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tdabench._io import (
    _jsonable,
    atomic_write_bytes,
    canonical_json,
    config_diff,
    describe_diff,
    read_safetensors,
    tensors_digest,
    write_safetensors,
)
from tdabench.errors import ConfigError, KeyMismatchError, NonFiniteError, ShapeError, StoreError
from tdabench.func.capture import LayerIO, capture_task, layer_param_names, select_modules
from tdabench.func.utils import Batch, ParamSpec, batch_size_of, batch_to, iter_batches

__all__ = [
    "FISHER_KINDS",
    "KFAC_FORMAT",
    "STRATEGIES",
    "DampingFactor",
    "KFACOperator",
    "LayerFactors",
    "data_fingerprint",
    "expand_labels",
    "factor_config",
    "fit_kfac",
    "sample_labels",
]

logger = logging.getLogger(__name__)

KFAC_FORMAT = (
    "tdabench-kfac/2"  # 2: independent labels in the eigenvalue-correction pass (fisher="true")
)
STRATEGIES = ("kfac", "ekfac")
#: a fraction of each layer's mean eigenvalue: one for every layer, or per module name
DampingFactor = float | Mapping[str, float] | None
FISHER_KINDS = ("empirical", "true", "ggn")


# ----------------------------------------------------------------------------- the operator
@dataclass
class LayerFactors:
    """Kronecker factors of one layer.

    Attributes:
        name: module name.
        param_names: its parameters in flat order (``weight``, then ``bias`` if any).
        weight_shape: shape of the module's weight.
        q_a: eigenvectors of ``A`` ``(d_in', d_in')``; ``eig_a`` its eigenvalues ``(d_in',)``.
        q_s: eigenvectors of ``S`` ``(d_out, d_out)``; ``eig_s`` its eigenvalues ``(d_out,)``.
        lam: EK-FAC corrected eigenvalues ``(d_out, d_in')``, ``None`` for K-FAC.
    """

    name: str
    param_names: list[str]
    weight_shape: tuple[int, ...]
    q_a: Tensor
    eig_a: Tensor
    q_s: Tensor
    eig_s: Tensor
    lam: Tensor | None = None

    @property
    def has_bias(self) -> bool:
        return len(self.param_names) == 2

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in')`` of the bias-augmented weight matrix."""
        return int(self.q_s.shape[0]), int(self.q_a.shape[0])

    def eigenvalues(self) -> Tensor:
        """``Λ`` ``(d_out, d_in')``: EK-FAC's corrected values, else ``λ_S λ_Aᵀ``."""
        if self.lam is not None:
            return self.lam
        return self.eig_s.clamp_min(0)[:, None] * self.eig_a.clamp_min(0)[None, :]

    def damping(self, damping: float = 0.0, damping_factor: DampingFactor = None) -> float:
        """``damping + damping_factor · mean(Λ)`` (the second term only when ``damping_factor`` is
        set; a mapping gives each layer its own factor, by module name)."""
        if isinstance(damping_factor, Mapping):
            if self.name not in damping_factor:
                raise ConfigError(
                    f"damping_factor has no entry for layer {self.name!r}; give every layer a factor "
                    "or pass one number for all"
                )
            damping_factor = damping_factor[self.name]
        extra = (
            0.0
            if damping_factor is None
            else float(damping_factor) * float(self.eigenvalues().mean())
        )
        return float(damping) + extra

    def rotate(self, V: Tensor) -> Tensor:
        """``Q_Sᵀ V Q_A`` for ``V`` ``(k, d_out, d_in')``."""
        return self.q_s.T @ V @ self.q_a

    def unrotate(self, V: Tensor) -> Tensor:
        """``Q_S V Q_Aᵀ`` for ``V`` ``(k, d_out, d_in')``."""
        return self.q_s @ V @ self.q_a.T

    def inverse_mvp(
        self, V: Tensor, damping: float = 0.0, damping_factor: DampingFactor = None
    ) -> Tensor:
        """``(F + λI)⁻¹ V`` for gradient matrices ``V`` ``(k, d_out, d_in')``."""
        lam = self.damping(damping, damping_factor)
        denom = self.eigenvalues().to(V.dtype) + lam
        return self.unrotate(self.rotate(V) / denom)

    def inverse_eigenvalues(
        self, damping: float = 0.0, damping_factor: DampingFactor = None
    ) -> Tensor:
        """``1 / (Λ + λ)`` ``(d_out, d_in')``: the inverse in the Kronecker eigenbasis."""
        return 1.0 / (self.eigenvalues() + self.damping(damping, damping_factor))

    def rotated_grads(self, io: LayerIO) -> Tensor:
        """Per-sample gradients in the eigenbasis, ``Q_Sᵀ (Σ_t g_t a_tᵀ) Q_A`` flattened: ``(B, d_out·d_in')``.

        Rotates the vectors ``g_t`` and ``a_t`` first (``O(T (d_out² + d_in'²))`` per sample), so a
        score ``⟨G_i, (F + λI)⁻¹ G_j⟩`` is ``⟨G̃_i, G̃_j / (Λ + λ)⟩`` with no back-rotation.
        """
        g = io.g @ self.q_s.to(io.g.dtype)
        a = io.a @ self.q_a.to(io.a.dtype)
        if g.shape[1] == 1:
            return (g[:, 0, :, None] * a[:, 0, None, :]).reshape(g.shape[0], -1)
        return torch.einsum("bto,bti->boi", g, a).reshape(g.shape[0], -1)

    def mvp(self, V: Tensor) -> Tensor:
        """``F V`` for ``V`` ``(k, d_out, d_in')``."""
        return self.unrotate(self.rotate(V) * self.eigenvalues().to(V.dtype))


@dataclass
class KFACOperator:
    """Block-diagonal K-FAC / EK-FAC curvature over several layers.

    Flat vectors are ordered like :attr:`spec` (each layer's ``weight`` then ``bias``, layers in
    model order), or like any :class:`~tdabench.func.utils.ParamSpec` with the same names passed
    as ``spec=``. Per-layer matrices ``(k, d_out, d_in')`` are ``[W | b]`` with the weight reshaped to
    ``(d_out, -1)`` (a Conv2d's ``(C_out, C_in·k_h·k_w)``).

    Attributes:
        layers: the per-layer factors, in model order.
        strategy: ``"kfac"`` or ``"ekfac"``.
        key: the provenance key of the fit (see the module docstring).
    """

    layers: list[LayerFactors]
    strategy: str
    key: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> ParamSpec:
        names, shapes = [], []
        for lf in self.layers:
            names.append(lf.param_names[0])
            shapes.append(torch.Size(lf.weight_shape))
            if lf.has_bias:
                names.append(lf.param_names[1])
                shapes.append(torch.Size([lf.shape[0]]))
        return ParamSpec(tuple(names), tuple(shapes))

    @property
    def dim(self) -> int:
        return self.spec.dim

    def to_layers(self, V: Tensor, spec: ParamSpec | None = None) -> list[Tensor]:
        """Flat rows ``(k, d)`` to per-layer matrices ``[(k, d_out, d_in')]``."""
        spec = spec or self.spec
        if V.dim() != 2 or V.shape[1] != spec.dim:
            raise ShapeError(f"expected vectors of shape (k, {spec.dim}), got {tuple(V.shape)}")
        out = []
        for lf in self.layers:
            a, b = spec.offsets(lf.param_names[0])
            W = V[:, a:b].reshape(V.shape[0], lf.shape[0], -1)
            if lf.has_bias:
                a, b = spec.offsets(lf.param_names[1])
                W = torch.cat([W, V[:, a:b].unsqueeze(-1)], dim=-1)
            out.append(W)
        return out

    def from_layers(self, mats: Sequence[Tensor], spec: ParamSpec | None = None) -> Tensor:
        """Inverse of :meth:`to_layers`: per-layer matrices to flat rows ``(k, d)``."""
        spec = spec or self.spec
        pieces: dict[str, Tensor] = {}
        for lf, M in zip(self.layers, mats, strict=True):
            k = M.shape[0]
            if lf.has_bias:
                pieces[lf.param_names[0]] = M[:, :, :-1].reshape(k, -1)
                pieces[lf.param_names[1]] = M[:, :, -1]
            else:
                pieces[lf.param_names[0]] = M.reshape(k, -1)
        missing = [n for n in spec.names if n not in pieces]
        if missing:
            raise ConfigError(
                f"parameters {missing} are not covered by the K-FAC layers; restrict the spec to them"
            )
        return torch.cat([pieces[n] for n in spec.names], dim=1)

    def inverse_mvp(
        self,
        V: Tensor,
        damping: float = 0.0,
        damping_factor: DampingFactor = None,
        spec: ParamSpec | None = None,
    ) -> Tensor:
        """``(F + λI)⁻¹ V`` row by row for flat ``V`` ``(k, d)``; ``λ`` per layer (see :meth:`LayerFactors.damping`)."""
        mats = self.to_layers(V, spec)
        return self.from_layers(
            [
                lf.inverse_mvp(M, damping, damping_factor)
                for lf, M in zip(self.layers, mats, strict=True)
            ],
            spec,
        )

    def mvp(self, V: Tensor, spec: ParamSpec | None = None) -> Tensor:
        """``F V`` row by row for flat ``V`` ``(k, d)``."""
        mats = self.to_layers(V, spec)
        return self.from_layers([lf.mvp(M) for lf, M in zip(self.layers, mats, strict=True)], spec)

    def dense(self, planner: Any = None) -> Tensor:
        """The block-diagonal approximation as a dense ``(d, d)`` matrix in :attr:`spec` order."""
        d = self.dim
        if planner is not None:
            planner.require(
                d * d * 8, f"a dense {d} x {d} K-FAC matrix", "use mvp/inverse_mvp instead"
            )
        eye = torch.eye(d, dtype=self.layers[0].q_a.dtype, device=self.layers[0].q_a.device)
        return self.mvp(eye)


# ----------------------------------------------------------------------------- provenance
def data_fingerprint(batches: Iterable[Batch]) -> dict[str, Any]:
    """A batching-independent fingerprint of the data: per tensor position of a batch, the sha256
    of its bytes in loader order, plus the per-sample shapes and dtypes and the sample count
    (``batches``, the number of batches, is returned too but is not part of a key)."""
    hashers: list[Any] = []
    meta: list[str] = []
    n = nb = 0
    for batch in batches:
        nb += 1
        ts = [batch] if isinstance(batch, Tensor) else [t for t in batch if isinstance(t, Tensor)]
        if not hashers:
            hashers = [hashlib.sha256() for _ in ts]
            meta = [f"{t.dtype}:{tuple(t.shape[1:])}" for t in ts]
        for h, t in zip(hashers, ts, strict=True):
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        n += batch_size_of(batch)
    return {"n": n, "tensors": meta, "sha256": [h.hexdigest() for h in hashers], "batches": nb}


def factor_config(
    task: Any,
    modules: Mapping[str, nn.Module],
    strategy: str,
    fisher: str,
    seed: int,
    index: int,
    data: Mapping[str, Any],
) -> dict[str, Any]:
    """The resolved configuration whose canonical JSON's sha256 is the factors' key."""
    model = task.model
    state = {
        **{n: p for n, p in task.get_params(index).items()},
        **{f"buffer:{n}": b for n, b in model.named_buffers()},
    }
    return _jsonable(
        {
            "format": KFAC_FORMAT,
            "strategy": strategy,
            "fisher": fisher,
            "seed": int(seed) if fisher == "true" else None,
            "modules": [
                [n, type(m).__name__, list(m.weight.shape), m.bias is not None]
                for n, m in modules.items()
            ],
            "params_sha256": tensors_digest(state),
            "data": dict(data),
        }
    )


class _FactorStore:
    """``<dir>/manifest.json`` + ``<stage>-<p>-of-<P>.safetensors`` partitions + ``factors.safetensors``."""

    def __init__(self, directory: str | Path, config: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.config = config
        self.key = hashlib.sha256(canonical_json(config).encode()).hexdigest()
        manifest = self.dir / "manifest.json"
        if manifest.is_file():
            old = json.loads(manifest.read_text())
            if old.get("key") != self.key:
                diff = describe_diff(config_diff(old.get("config", {}), config))
                raise KeyMismatchError(
                    f"factor directory {str(self.dir)!r} holds factors for another model, data or setting ({diff}); "
                    "pass another factor_dir (or delete this one) -- factors are never reused across keys"
                )
        else:
            atomic_write_bytes(
                manifest,
                json.dumps(
                    {"format": KFAC_FORMAT, "key": self.key, "config": config}, indent=1
                ).encode(),
            )

    def path(self, stage: str, part: int | None = None, parts: int | None = None) -> Path:
        return self.dir / (
            f"{stage}.safetensors" if part is None else f"{stage}-{part}-of-{parts}.safetensors"
        )

    def load(self, path: Path) -> dict[str, Tensor] | None:
        if not path.is_file():
            return None
        return read_safetensors(path, key=self.key, error_cls=StoreError)[0]

    def save(self, path: Path, tensors: Mapping[str, Tensor]) -> None:
        write_safetensors(path, tensors, {"key": self.key, "format": KFAC_FORMAT})


# ----------------------------------------------------------------------------- fitting
def _labels_and_logits(
    task: Any, batch: Batch, index: int, fisher: str
) -> tuple[Tensor, Tensor, Any]:
    """``(inputs, labels, logits)`` of a classification batch ``(inputs, labels, ...)``."""
    if isinstance(batch, Tensor) or len(batch) < 2:
        raise ConfigError(
            f"fisher={fisher!r} needs batches (inputs, labels, ...) to replace the labels; use fisher='empirical'"
        )
    with torch.no_grad():
        logits = task.forward(task.get_params(index), batch[0])
    return batch[0], batch[1], logits


def sample_labels(task: Any, batch: Batch, index: int, generator: torch.Generator) -> Batch:
    """``batch`` with its labels (second element) replaced by labels drawn from the model's softmax."""
    x, y, logits = _labels_and_logits(task, batch, index, "true")
    if not isinstance(logits, Tensor) or logits.shape[: y.dim()] != y.shape:
        raise ConfigError(
            "fisher='true' needs model(inputs) to return logits (B, C) or (B, T, C) matching the labels' shape; "
            "use fisher='empirical'"
        )
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]).double(), dim=-1).cpu()
    drawn = (
        torch.multinomial(probs, 1, generator=generator)
        .reshape(y.shape)
        .to(device=y.device, dtype=y.dtype)
    )
    return (x, drawn, *batch[2:]) if isinstance(batch, tuple) else [x, drawn, *batch[2:]]


def expand_labels(task: Any, batch: Batch, index: int) -> tuple[Batch, Tensor]:
    """``batch`` with every sample repeated once per class, labelled ``0 .. C-1``, and the model's
    probabilities ``(B, C)`` of those labels (for ``fisher="ggn"``)."""
    _, y, logits = _labels_and_logits(task, batch, index, "ggn")
    if not isinstance(logits, Tensor) or logits.dim() != 2 or y.dim() != 1:
        raise ConfigError(
            "fisher='ggn' needs logits (B, C) and one label per sample; use fisher='true' for sequences"
        )
    B, C = logits.shape
    probs = torch.softmax(logits.double(), dim=-1)
    rep = [t.repeat_interleave(C, dim=0) if isinstance(t, Tensor) else t for t in batch]
    rep[1] = torch.arange(C, device=y.device, dtype=y.dtype).repeat(B)
    return (tuple(rep) if isinstance(batch, tuple) else rep), probs


@dataclass
class _Fit:
    task: Any
    modules: dict[str, nn.Module]
    fisher: str
    seed: int
    index: int
    device: torch.device
    planner: Any

    def layer_io(self, bi: int, batch: Batch, stage: int = 0) -> dict[str, LayerIO]:
        """Captures of batch ``bi``; ``stage`` (0: covariances, 1: eigenvalue correction) draws
        independent labels for ``fisher="true"``."""
        if self.fisher == "true":
            gen = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + bi) * 2 + stage)
            batch = sample_labels(self.task, batch, self.index, gen)
        elif self.fisher == "ggn":
            return self._expected(batch)
        return capture_task(self.task, batch, self.modules, "loss", self.index, self.device)

    def _expected(self, batch: Batch) -> dict[str, LayerIO]:
        """``a`` ``(B, 1, d_in')`` and ``g`` ``(B, C, d_out)`` = ``√p_c`` times the gradient for label ``c``."""
        rep, probs = expand_labels(self.task, batch, self.index)
        B, C = probs.shape
        io = capture_task(self.task, rep, self.modules, "loss", self.index, self.device)
        out = {}
        for name, rec in io.items():
            if rec.a.shape[1] != 1:
                raise ConfigError(
                    f"fisher='ggn' needs one position per sample; module {name!r} has {rec.a.shape[1]}"
                )
            w = probs.sqrt().to(rec.g.dtype).reshape(B, C, 1)
            out[name] = LayerIO(a=rec.a.reshape(B, C, -1)[:, :1], g=rec.g.reshape(B, C, -1) * w)
        return out


def _covariance_sums(fit: _Fit, batches: Iterable[tuple[int, Batch]]) -> dict[str, Tensor]:
    """``A``/``S`` sums, sample and position counts over ``(batch index, batch)`` pairs."""
    out: dict[str, Tensor] = {"n": torch.zeros((), dtype=torch.float64)}
    for bi, batch in batches:
        io = fit.layer_io(bi, batch)
        out["n"] += batch_size_of(batch)
        for name, rec in io.items():
            a = rec.a.reshape(-1, rec.a.shape[-1])
            g = rec.g.reshape(-1, rec.g.shape[-1])
            _add_sum(out, f"{name}|A", a.T @ a)
            _add_sum(out, f"{name}|S", g.T @ g)
            _add_sum(out, f"{name}|T", torch.tensor(float(a.shape[0]), dtype=torch.float64))
    return out


def _lambda_sums(
    fit: _Fit, eig: Mapping[str, LayerFactors], batches: Iterable[tuple[int, Batch]]
) -> dict[str, Tensor]:
    """EK-FAC: ``Σ_n (Q_Sᵀ G_n Q_A)²`` per layer over ``(batch index, batch)`` pairs."""
    out: dict[str, Tensor] = {}
    for bi, batch in batches:
        for name, rec in fit.layer_io(bi, batch, stage=1).items():
            lf = eig[name]
            ga, aa = (
                rec.g @ lf.q_s.to(rec.g.dtype),
                rec.a @ lf.q_a.to(rec.a.dtype),
            )  # (B, T, d_out), (B, T, d_in')
            if (
                aa.shape[1] == 1
            ):  # rank one per sample: Σ_n (g̃_n²)(ã_n²)ᵀ is one GEMM ("ggn": Σ_c over g's axis 1)
                val = (ga**2).sum(1).T @ (aa[:, 0] ** 2)
            else:
                d_out, d_in = lf.shape
                rows = fit.planner.rows(
                    d_out * d_in * ga.element_size() * 2, stream=True, maximum=ga.shape[0]
                )
                val = sum(
                    (torch.einsum("bto,bti->boi", ga[s : s + rows], aa[s : s + rows]) ** 2).sum(0)
                    for s in range(0, ga.shape[0], rows)
                )
            _add_sum(out, name, val)
    return out


def _add_sum(sums: dict[str, Tensor], key: str, value: Tensor) -> None:
    """``sums[key] += value`` in float64 (created on first use)."""
    sums[key] = sums[key] + value.double() if key in sums else value.double()


def _partition_of(bi: int, num_batches: int, parts: int) -> int:
    return min(parts - 1, bi * parts // max(1, num_batches))


def _staged(
    store: _FactorStore | None,
    stage: str,
    parts: int,
    batches: Callable[[], Iterable[Batch]],
    num_batches: int,
    work: Callable[[Iterable[tuple[int, Batch]]], dict[str, Tensor]],
) -> dict[str, Tensor]:
    """Sum ``work`` over the partitions of ``batches()`` (one streaming pass per partition still
    to compute), reusing and saving partitions in ``store``."""
    total: dict[str, Tensor] = {}
    for p in range(parts):
        path = store.path(stage, p, parts) if store is not None else None
        got = store.load(path) if store is not None else None
        if got is None:
            mine = (
                (bi, b)
                for bi, b in enumerate(batches())
                if _partition_of(bi, num_batches, parts) == p
            )
            got = {k: v.cpu() for k, v in work(mine).items()}
            if store is not None:
                store.save(path, got)
        else:
            logger.info("K-FAC %s partition %d/%d reused from %s", stage, p + 1, parts, path)
        for k, v in got.items():
            total[k] = total[k] + v if k in total else v.clone()
    return total


def _eigen(
    name: str,
    module: nn.Module,
    sums: Mapping[str, Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> LayerFactors:
    n = float(sums["n"])
    A = sums[f"{name}|A"] / float(sums[f"{name}|T"])
    S = sums[f"{name}|S"] / n
    eig_a, q_a = torch.linalg.eigh(A)
    eig_s, q_s = torch.linalg.eigh(S)
    cast = {"dtype": dtype, "device": device}
    return LayerFactors(
        name,
        layer_param_names(name, module),
        tuple(module.weight.shape),
        q_a.to(**cast),
        eig_a.to(**cast),
        q_s.to(**cast),
        eig_s.to(**cast),
    )


def fit_kfac(
    task: Any,
    loader: Iterable[Batch],
    module_name: str | Sequence[str] | None = None,
    strategy: str = "ekfac",
    fisher: str = "empirical",
    index: int = 0,
    device: str | torch.device = "cpu",
    factor_dir: str | Path | None = None,
    num_partitions: int = 1,
    seed: int = 0,
    memory_budget: Any = None,
) -> KFACOperator:
    """Fit K-FAC or EK-FAC factors of checkpoint ``index`` of ``task`` over ``loader``.

    Args:
        task: an :class:`~tdabench.task.AttributionTask` whose ``loss_func`` returns the batch mean.
        loader: the training data (iterated up to three times, in the same order each time).
        module_name: modules to cover (see :func:`~tdabench.func.capture.select_modules`).
        strategy: ``"kfac"`` or ``"ekfac"`` (adds the eigenvalue correction pass).
        fisher: ``"empirical"``, ``"true"`` or ``"ggn"`` (see the module docstring).
        index: checkpoint index.
        device: where captures and factors live.
        factor_dir: store partitions and factors here (resumable; bound to the provenance key).
        num_partitions: groups of batches fitted and saved separately (only useful with ``factor_dir``).
        seed: seed of the sampled labels for ``fisher="true"``.
        memory_budget: override of the memory planner's budget.

    Returns:
        The :class:`KFACOperator`.

    Raises:
        ConfigError: bad arguments; KeyMismatchError: ``factor_dir`` holds another key.
    """
    from tdabench.memory import planner_for

    _check_fit_arguments(strategy, fisher, num_partitions)
    dev = torch.device(device)
    modules = select_modules(task.model, module_name)

    def batches() -> Iterable[Batch]:  # streamed: the loader is read once per pass, never kept
        return (batch_to(b, dev) for b in iter_batches(loader, "K-FAC fitting loader"))

    fingerprint = data_fingerprint(batches())
    data = {k: v for k, v in fingerprint.items() if k != "batches"}
    config = factor_config(task, modules, strategy, fisher, seed, index, data)
    store = _FactorStore(factor_dir, config) if factor_dir is not None else None
    final = store.load(store.path("factors")) if store is not None else None
    if final is None:
        nb = int(fingerprint["batches"])
        fit = _Fit(task, modules, fisher, seed, index, dev, planner_for(dev, memory_budget))
        final = _fit_tensors(fit, store, min(num_partitions, nb), batches, nb, strategy)
        if store is not None:
            store.save(store.path("factors"), final)
    else:
        logger.info("K-FAC factors reused from %s", store.path("factors"))
    dtype = next(iter(task.get_params(index).values())).dtype
    layers = [_layer_from(name, m, final, dtype, dev) for name, m in modules.items()]
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return KFACOperator(layers, strategy, store.key if store is not None else digest, config)


def _check_fit_arguments(strategy: str, fisher: str, num_partitions: int) -> None:
    """Raise :class:`ConfigError` for an unknown strategy or Fisher kind, or a bad partition count."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if fisher not in FISHER_KINDS:
        raise ConfigError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
    if (
        isinstance(num_partitions, bool)
        or not isinstance(num_partitions, int)
        or num_partitions < 1
    ):
        raise ConfigError(f"num_partitions must be an int >= 1, got {num_partitions!r}")


def _fit_tensors(
    fit: _Fit,
    store: _FactorStore | None,
    parts: int,
    batches: Callable[[], Iterable[Batch]],
    nb: int,
    strategy: str,
) -> dict[str, Tensor]:
    sums = _staged(store, "covariance", parts, batches, nb, lambda bs: _covariance_sums(fit, bs))
    out: dict[str, Tensor] = {}
    eig = {}
    for name, m in fit.modules.items():
        lf = _eigen(name, m, sums, torch.float64, torch.device("cpu"))
        eig[name] = lf
        out.update(
            {
                f"{name}|q_a": lf.q_a,
                f"{name}|eig_a": lf.eig_a,
                f"{name}|q_s": lf.q_s,
                f"{name}|eig_s": lf.eig_s,
            }
        )
    if strategy == "ekfac":
        dtype = next(iter(fit.task.get_params(fit.index).values())).dtype
        cast = {
            n: LayerFactors(
                n,
                lf.param_names,
                lf.weight_shape,
                lf.q_a.to(fit.device, dtype),
                lf.eig_a,
                lf.q_s.to(fit.device, dtype),
                lf.eig_s,
            )
            for n, lf in eig.items()
        }
        lam = _staged(store, "lambda", parts, batches, nb, lambda bs: _lambda_sums(fit, cast, bs))
        for name in fit.modules:
            out[f"{name}|lam"] = lam[name].cpu() / float(sums["n"])
    for k, v in out.items():
        if not bool(torch.isfinite(v).all()):
            raise NonFiniteError(
                f"K-FAC factor {k} is not finite; check the model, the data and the loss"
            )
    return out


def _layer_from(
    name: str, m: nn.Module, t: Mapping[str, Tensor], dtype: torch.dtype, dev: torch.device
) -> LayerFactors:
    def get(k: str) -> Tensor:
        return t[f"{name}|{k}"].to(device=dev, dtype=dtype)

    lam = get("lam") if f"{name}|lam" in t else None
    return LayerFactors(
        name,
        layer_param_names(name, m),
        tuple(m.weight.shape),
        get("q_a"),
        get("eig_a"),
        get("q_s"),
        get("eig_s"),
        lam,
    )
