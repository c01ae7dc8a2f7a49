"""Memory planning in one place: how big every piece of work may be on a given device.

Every attributor, solver, projector and trainer asks a :class:`MemoryPlanner` how many rows of
something fit, instead of keeping byte constants of its own. The budget comes from the device:

- **CUDA**: the free memory reported by ``torch.cuda.mem_get_info`` minus a safety margin
  (``max(1 GiB, 10% of the card)``), because other allocations (the model, the optimizer, the
  caching allocator's fragmentation) share the card.
- **CPU**: half of ``MemAvailable`` from ``/proc/meminfo`` (or of physical memory where that
  file does not exist), because the process also holds the loaders, the model and Python objects.
- **other devices** (MPS, XPU): a quarter of physical memory.

It can be overridden per attributor (``memory_budget=...``), for a whole process with the
environment variable ``TDABENCH_MEMORY_BUDGET``, and in the pipeline config. A budget may be
an integer number of bytes or a string such as ``"8GiB"``, ``"512MB"`` or ``"0.5"`` (a fraction
of what the device reports).

**Speed, not only capacity.** On the CPU, streaming pieces (per-sample-gradient rows that are
projected right away, projection chunks, replayed batches) are additionally capped at
:data:`CPU_STREAM_BYTES` per thread: past that size a piece no longer fits in the caches and
only costs page faults (measured on the MNIST harness, one thread). On a GPU there is no such
cap: large pieces are what keep its kernels busy, so pieces grow to the budget share.

The planner logs its decisions at debug level; it never prints.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass

import torch

from tdabench.errors import ConfigError, MemoryLimitError

__all__ = [
    "CPU_STREAM_BYTES",
    "MemoryPlanner",
    "device_budget",
    "parse_bytes",
    "planner_for",
]

log = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2

CPU_STREAM_BYTES = 64 * MiB
"""Cap of one streaming piece per CPU thread (cache-friendly; see the module docstring)."""

_ENV = "TDABENCH_MEMORY_BUDGET"
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": MiB,
    "gib": GiB,
    "tib": 1024**4,
}


def parse_bytes(value: int | float | str, total: int | None = None) -> int:
    """Parse a budget: bytes (int), ``"8GiB"``/``"512MB"``, or a fraction in ``(0, 1]`` of ``total``.

    Raises:
        ConfigError: for anything else, naming the accepted forms.
    """
    if isinstance(value, bool):
        raise ConfigError(f"memory_budget must be bytes or a string like '8GiB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"memory_budget must be positive, got {value}")
        return value
    if isinstance(value, float):
        if 0 < value <= 1 and total is not None:
            return max(1, int(value * total))
        if value >= 1 and math.isfinite(value):
            return int(value)
        raise ConfigError(
            f"memory_budget {value!r}: give bytes, a string like '8GiB', or a fraction in (0, 1]"
        )
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            num = float(m.group(1))
            if m.group(2) == "" and 0 < num <= 1 and "." in m.group(1):
                return parse_bytes(num, total)
            nbytes = int(num * _UNITS[m.group(2).lower()])
            if nbytes > 0:
                return nbytes
        raise ConfigError(
            f"memory_budget {value!r} is not understood: use bytes (e.g. 8589934592), "
            "a size with a unit ('8GiB', '512MB') or a fraction of the device ('0.5')"
        )
    raise ConfigError(
        f"memory_budget must be bytes or a string like '8GiB', got {type(value).__name__}"
    )


def _physical_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * GiB


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return _physical_bytes()


def device_budget(device: torch.device | str) -> tuple[int, int]:
    """``(budget, total)`` bytes for ``device``, before any override.

    ``total`` is what the device has in all (used to resolve fractional overrides).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        margin = max(GiB, total // 10)
        return max(free - margin, free // 4), int(total)
    if dev.type == "cpu":
        avail = _available_ram()
        return max(avail // 2, 64 * MiB), _physical_bytes()
    total = _physical_bytes()
    return total // 4, total


@dataclass(frozen=True)
class MemoryPlanner:
    """Sizes pieces of work for one device under one budget.

    Attributes:
        device: the device the work runs on.
        budget: bytes the work may hold at once.
        threads: CPU threads (scales the CPU streaming cap).
    """

    device: torch.device
    budget: int
    threads: int = 1

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    def share(self, fraction: float = 1.0) -> int:
        """Bytes for one consumer that gets ``fraction`` of the budget."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        return max(1, int(self.budget * fraction))

    def stream_bytes(self, fraction: float = 1.0) -> int:
        """Bytes of one streaming piece (consumed right away): the share, capped on the CPU."""
        nbytes = self.share(fraction)
        if self.is_cpu:
            nbytes = min(nbytes, CPU_STREAM_BYTES * max(1, self.threads))
        return nbytes

    def rows(
        self,
        bytes_per_row: int,
        *,
        fraction: float = 1.0,
        stream: bool = False,
        minimum: int = 1,
        maximum: int | None = None,
    ) -> int:
        """How many rows of ``bytes_per_row`` bytes fit in a piece.

        Args:
            bytes_per_row: bytes one row needs (all temporaries counted by the caller).
            fraction: the share of the budget this piece may use.
            stream: the piece is consumed right away (CPU cache cap applies).
            minimum: never fewer rows than this (one row must always be possible).
            maximum: never more rows than this (e.g. the number of rows there are).
        """
        nbytes = self.stream_bytes(fraction) if stream else self.share(fraction)
        n = max(int(minimum), nbytes // max(1, int(bytes_per_row)))
        if maximum is not None:
            n = min(n, max(int(minimum), int(maximum)))
        return int(n)

    def fits(self, nbytes: int, fraction: float = 1.0) -> bool:
        """Whether ``nbytes`` fit in ``fraction`` of the budget."""
        return int(nbytes) <= self.share(fraction)

    def require(self, nbytes: int, what: str, fix: str, fraction: float = 1.0) -> None:
        """Raise :class:`MemoryLimitError` naming ``what`` and ``fix`` when ``nbytes`` do not fit."""
        if not self.fits(nbytes, fraction):
            limit = self.share(fraction)
            raise MemoryLimitError(
                f"{what} needs {nbytes / GiB:.2f} GiB, over the {limit / GiB:.2f} GiB memory budget "
                f"on {self.device}; {fix}, or raise memory_budget (or {_ENV})"
            )

    def __repr__(self) -> str:
        return f"MemoryPlanner(device={self.device}, budget={self.budget / GiB:.2f} GiB, threads={self.threads})"


def planner_for(
    device: torch.device | str = "cpu", memory_budget: int | float | str | None = None
) -> MemoryPlanner:
    """The planner for ``device``: ``memory_budget``, else ``$TDABENCH_MEMORY_BUDGET``, else the device's.

    Args:
        device: where the work runs.
        memory_budget: bytes, ``"8GiB"``-style string, or a fraction of the device's memory.

    Raises:
        ConfigError: for a malformed budget.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    budget, total = device_budget(dev)
    override = memory_budget if memory_budget is not None else os.environ.get(_ENV) or None
    if override is not None:
        budget = parse_bytes(override, total)
    threads = torch.get_num_threads() if dev.type == "cpu" else 1
    plan = MemoryPlanner(device=dev, budget=int(budget), threads=threads)
    log.debug("memory plan: %r (override=%r)", plan, override)
    return plan
