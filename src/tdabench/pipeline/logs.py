"""Where a stage's story goes: its rule's log file, the console, and progress on a terminal.

Application code only (the ``tdabench`` CLI and the shard workers it launches): the library
never configures a handler.

* :func:`setup_logging` sends every record of the ``tdabench``, ``submitit`` and ``py.warnings``
  loggers to the rule's ``--log`` file (start, parameters and provenance key, per-shard/batch
  progress, "done" lines with counts and times, warnings, and the traceback of a failure) and
  the records of every logger to stderr (one line per record, tracebacks left to Python). The
  file is opened in append mode after being emptied once: importing submitit runs
  ``logging.config.dictConfig``, which closes every existing handler, and a handler in append
  mode reopens its file on the next record where a ``mode="w"`` one would drop them all.
* :func:`worker_logging` gives a shard worker process (submitit, local or SLURM) a stderr
  handler, so its story lands in the worker's ``*_log.err`` file, which the rule log names.

Progress (a tqdm bar on a terminal, log lines otherwise) is :class:`tdabench.groundtruth.progress.Progress`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["FILE_LOGGERS", "setup_logging", "worker_logging"]

#: Loggers whose records a rule's log file receives.
FILE_LOGGERS = ("tdabench", "submitit", "py.warnings")

_FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_tdabench_cli"


class _OneLine(logging.Formatter):
    """The console's format: the message without the traceback (Python prints that itself)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _drop_handlers(logger: logging.Logger) -> None:
    for h in [h for h in logger.handlers if getattr(h, _MARK, False)]:
        logger.removeHandler(h)  # a second setup in one process (tests) replaces them
        h.close()


def setup_logging(log: str | None, verbose: bool = False) -> None:
    """Console (root logger, stderr) and, with ``log``, the rule's log file (see the module doc).

    Args:
        log: the file to write (emptied first), or ``None`` for the console only.
        verbose: DEBUG instead of INFO.
    """
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    for name in ("", *FILE_LOGGERS):
        _drop_handlers(logging.getLogger(name))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_OneLine(_FMT))
    setattr(console, _MARK, True)
    root.addHandler(console)
    logging.captureWarnings(True)
    if not log:
        return
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    Path(log).write_text("")
    file = logging.FileHandler(log, mode="a")
    file.setFormatter(logging.Formatter(_FMT))
    setattr(file, _MARK, True)
    for name in FILE_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(file)
        if logger.level == logging.NOTSET or logger.level > level:
            logger.setLevel(level)


def worker_logging() -> None:
    """In a shard worker process: ``tdabench`` records to stderr, unless something (the CLI of
    an in-process ``debug`` launch) already handles them."""
    logger = logging.getLogger("tdabench")
    if logger.handlers or logging.getLogger().handlers:
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(_FMT))
    setattr(h, _MARK, True)
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
