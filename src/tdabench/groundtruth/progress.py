"""Progress of long loops: a tqdm bar on a terminal, periodic log lines otherwise.

A rule's log file (and a SLURM job's) is not a terminal, so a bar there would be noise or
nothing; :class:`Progress` draws a tqdm bar only where stderr is a terminal (tqdm's
``disable=None`` rule) and otherwise logs a line every ``every_s`` seconds and each
``every_frac`` of the total, through the caller's logger. Library code: it configures no handler.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["Progress", "is_terminal"]

T = TypeVar("T")


def is_terminal() -> bool:
    """Whether stderr is a terminal (where tqdm draws its bars)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of ``total`` units: a tqdm bar on a terminal, periodic log lines otherwise.

    Args:
        total: units of work (shards, batches).
        desc: what is counted, shown in the bar and the lines (e.g. ``"gt-lds shards"``).
        logger: where the lines go.
        every_s: a line at the latest this many seconds after the previous one ...
        every_frac: ... and each time this fraction of ``total`` is passed.
        terminal: ``None`` = :func:`is_terminal`; ``True``/``False`` force the mode.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        logger: logging.Logger,
        every_s: float = 30.0,
        every_frac: float = 0.1,
        terminal: bool | None = None,
    ) -> None:
        self.total, self.desc, self.logger = int(total), desc, logger
        self.every_s, self.every_frac = float(every_s), float(every_frac)
        self.n = 0
        self._t0 = self._last = time.perf_counter()
        self._next = self.every_frac
        self._bar: Any = None
        if is_terminal() if terminal is None else terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, file=sys.stderr, disable=False)

    def update(self, k: int = 1) -> None:
        """``k`` more units done."""
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
            return
        now = time.perf_counter()
        frac = self.n / self.total if self.total else 1.0
        if frac + 1e-12 >= self._next or now - self._last >= self.every_s or self.n == self.total:
            while self._next <= frac + 1e-12:
                self._next += self.every_frac
            self._last = now
            self.logger.info(
                "%s: %d/%d (%.0f%%) in %.1f s", self.desc, self.n, self.total, 100 * frac,
                now - self._t0,
            )  # fmt: skip

    def close(self) -> None:
        """Close the bar (a terminal); nothing to do otherwise."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, counting one unit after each."""
        for item in items:
            yield item
            self.update()
