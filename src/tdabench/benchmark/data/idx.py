"""The IDX file format of MNIST and Fashion-MNIST (plain or gzip-compressed).

An IDX file is: two zero bytes, a type code byte, the number of dimensions ``k``, then ``k``
big-endian uint32 sizes, then the values in C order, big-endian.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from tdabench._io import atomic_write_bytes
from tdabench.errors import DataError

__all__ = ["read_idx", "write_idx"]

_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {np.dtype(v).newbyteorder("=").str: k for k, v in _TYPES.items()}
_CODES.update({np.dtype(v).str: k for k, v in _TYPES.items()})
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(
                f"{str(path)!r} is a damaged gzip file ({exc}); download it again"
            ) from exc
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` detected from the content, not the name).

    Args:
        path: the file.

    Returns:
        array of the file's shape and type (native byte order).

    Raises:
        DataError: the file is missing, truncated, or not IDX.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"IDX file {str(p)!r} not found; pass the folder that holds it as data_root"
        )
    raw = _read_bytes(p)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise DataError(
            f"{str(p)!r} is not an IDX file (bad magic {raw[:4].hex()}); check the file"
        )
    dtype = _TYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{str(p)!r} is truncated inside its IDX header; download it again")
    shape = tuple(int(x) for x in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"{str(p)!r} holds {len(raw) - header} data bytes but its header {shape} needs "
            f"{count * dtype.itemsize}; the file is truncated or damaged"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip it when ``compress`` (default: name ends in ``.gz``).

    The file is written to a temporary name and moved into place.
    """
    p = Path(path)
    a = np.asarray(array)
    code = _CODES.get(a.dtype.str) or _CODES.get(a.dtype.newbyteorder("=").str)
    if code is None:
        raise DataError(
            f"IDX cannot store dtype {a.dtype}; use uint8, int8, int16, int32, float32 or float64"
        )
    be = a.astype(_TYPES[code], copy=False)
    head = bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
    payload = head + np.ascontiguousarray(be).tobytes()
    if compress if compress is not None else p.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    atomic_write_bytes(p, payload)
    return p
