"""CIFAR-10 / CIFAR-2 from the official "python version" batches, read without running code.

Each batch (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) is a pickled dict with
``b"data"`` (uint8 ``(N, 3072)``, channel-major 32x32 images) and ``b"labels"`` (N ints).
Pickles can execute arbitrary code when loaded, so they are read with a restricted
unpickler that resolves only the few numpy/builtin globals such a batch needs and refuses
every other global with :class:`~tdabench.errors.UnsafeFileError`.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdabench.benchmark.data.common import BenchmarkData, describe_files, require_path
from tdabench.benchmark.data.mnist import select_indices
from tdabench.errors import DataError, UnsafeFileError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR_CLASSES",
    "find_cifar_batches",
    "load_cifar",
    "read_cifar_batch",
]

#: Class names of CIFAR-10, index = label.
CIFAR_CLASSES = tuple("airplane automobile bird cat deer dog frog horse ship truck".split())  # noqa: SIM905
#: Per-channel mean / std of the CIFAR-10 training set, used to standardise inputs.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILE = "test_batch"


def _numpy_core(name: str) -> Any:
    try:
        import numpy._core as core  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        import numpy.core as core  # type: ignore[no-redef]
    return getattr(core, name)


def _allowed() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_core("multiarray")
    numeric = _numpy_core("numeric")
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
        ("builtins", "bytearray"): bytearray,
        ("__builtin__", "bytearray"): bytearray,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = multiarray._reconstruct
        table[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(mod, "_frombuffer")] = numeric._frombuffer
    return table


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only an allow-list of globals and never imports a module."""

    def __init__(self, fh: io.BufferedIOBase, path: str) -> None:
        super().__init__(fh, encoding="bytes")
        self._path = path
        self._table = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._table.get((module, name))
        if obj is None:
            raise UnsafeFileError(
                f"{self._path!r} asks to load the global {module}.{name}, which a CIFAR batch never "
                "needs; the file is refused because unpickling it could run code. Use the official "
                "CIFAR-10 python batches"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(
            f"{self._path!r} uses pickle persistent ids; a CIFAR batch never does, so it is refused"
        )


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch with the restricted unpickler.

    Returns:
        ``(data, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    Raises:
        UnsafeFileError: the pickle references any global outside the allow-list.
        DataError: the file is missing, not a pickle, or lacks ``data``/``labels`` of the right shape.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"CIFAR batch {str(p)!r} not found; pass the cifar-10-batches-py folder as data_root"
        )
    with open(p, "rb") as fh:
        try:
            obj = _RestrictedUnpickler(fh, str(p)).load()
        except UnsafeFileError:
            raise
        except Exception as exc:
            raise DataError(
                f"{str(p)!r} is not a readable CIFAR batch ({type(exc).__name__}: {exc})"
            ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{str(p)!r} holds a {type(obj).__name__}, not the dict of a CIFAR batch")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in d or not ("labels" in d or "fine_labels" in d):
        raise DataError(
            f"{str(p)!r} lacks 'data' or 'labels' (keys: {sorted(map(str, d))}); is it a CIFAR-10 batch?"
        )
    data = d["data"]
    labels = np.asarray(d.get("labels", d.get("fine_labels")))
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        raise DataError(
            f"{str(p)!r}: 'data' must be a uint8 array (N, 3072), got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or labels.dtype.kind not in "iu":
        raise DataError(
            f"{str(p)!r}: 'labels' must be {data.shape[0]} integers, got {labels.dtype} {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def find_cifar_batches(root: str | os.PathLike, setting: str | None = None) -> dict[str, Path]:
    """The six batch files under ``root`` or ``root/cifar-10-batches-py``."""
    base = require_path(root, "CIFAR-10 data folder", setting)
    for folder in (base, base / "cifar-10-batches-py"):
        files = {name: folder / name for name in (*_TRAIN_FILES, _TEST_FILE)}
        if all(p.is_file() for p in files.values()):
            return files
    missing = [n for n in (*_TRAIN_FILES, _TEST_FILE) if not (base / n).is_file()]
    how = f"get_setting({setting!r}).load(data_root=...)" if setting else "data_root"
    raise DataError(
        f"CIFAR-10 python batches missing under {str(base)!r}: {missing}; extract cifar-10-python.tar.gz "
        f"and pass the cifar-10-batches-py folder with {how}"
    )


def _standardise(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x.astype(np.float32) / 255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (t - mean) / std


def _keep_classes(
    x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The images ``(m, 3, 32, 32)`` of ``classes`` and their labels ``(m,)`` renumbered ``0..``."""
    remap = np.full(10, -1, dtype=np.int64)
    remap[list(classes)] = np.arange(len(classes))
    keep = np.isin(y, classes)
    return x[keep], remap[y[keep]]


def load_cifar(
    root: str | os.PathLike,
    n_train: int,
    n_test: int,
    classes: tuple[int, ...] | None = None,
    subset: str = "first",
    seed: int = 0,
    setting: str | None = None,
) -> BenchmarkData:
    """CIFAR-10, or a class subset of it (CIFAR-2), from the python batches.

    Args:
        root: folder with ``data_batch_1..5`` and ``test_batch`` (or its parent).
        n_train, n_test: samples taken, after the class filter, from the training batches
            (concatenated in order 1..5) and from ``test_batch``.
        classes: CIFAR-10 labels to keep, relabelled ``0..len(classes)-1`` in the given order
            (``(3, 5)``: cat -> 0, dog -> 1); ``None`` keeps all ten.
        subset: ``"first"`` (file order; default) or ``"random"`` (seeded).
        seed: seed of the ``"random"`` choice (recorded either way).

    Returns:
        inputs float32 ``(n, 3, 32, 32)`` standardised with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`,
        labels int64 ``(n,)``.
    """
    files = find_cifar_batches(root, setting)
    parts = [read_cifar_batch(files[n]) for n in _TRAIN_FILES]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = read_cifar_batch(files[_TEST_FILE])
    if classes is not None:
        classes = tuple(int(c) for c in classes)
        x_tr, y_tr = _keep_classes(x_tr, y_tr, classes)
        x_te, y_te = _keep_classes(x_te, y_te, classes)
    tr = select_indices(
        x_tr.shape[0], n_train, subset, seed, "CIFAR training batches (after the class filter)"
    )
    te = select_indices(
        x_te.shape[0], n_test, subset, seed + 1, "CIFAR test batch (after the class filter)"
    )
    meta = {
        "source": "cifar10-python-batches",
        "root": str(Path(root)),
        "files": describe_files(files),
        "classes": list(classes) if classes is not None else list(range(10)),
        "class_names": [CIFAR_CLASSES[c] for c in (classes if classes is not None else range(10))],
        "split": {
            "method": subset,
            "seed": int(seed),
            "train_from": "data_batch_1..5",
            "test_from": "test_batch",
        },
        "input_transform": {"scale": "1/255", "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
    }
    return BenchmarkData(
        train=(_standardise(x_tr[tr]), torch.from_numpy(y_tr[tr])),
        test=(_standardise(x_te[te]), torch.from_numpy(y_te[te])),
        meta=meta,
    )
