"""Run independent shards of work through submitit: SLURM job arrays, local processes, or in-process.

The launcher is the bridge between a Snakemake rule that runs on the submit host and the
retraining shards that run on cluster nodes. It

* skips shards that are already complete (``is_complete(shard_id)`` is the only source of truth:
  a shard is done when its output file exists, whatever the scheduler says);
* submits the rest as **one** job array (``executor.map_array``), throttled by
  ``array_parallelism`` (``slurm_array_parallelism`` on SLURM; waves of that size locally);
* blocks until every task has finished, polling ``sacct`` once per round for all tasks;
* resubmits tasks that failed, were cancelled, timed out or were preempted, up to ``max_retries``
  times, and raises :class:`LaunchError` naming the failing shards and their log files otherwise;
* wraps the shard function in a :class:`submitit.helpers.Checkpointable`, so a task that hits its
  time limit or is preempted is requeued by SLURM with the same shard id (shards write atomically,
  so a requeued task simply recomputes its shard);
* ``kind="debug"`` runs the shards in this process, one after the other, without submitit
  (a failing shard's traceback goes to ``<folder>/debug-shard<i>.log`` and it is retried);
* submits inside :func:`submitit.helpers.clean_env` so that a launcher running inside a SLURM job
  (e.g. a Snakemake job of the ``slurm`` profile) does not leak that job's settings to its array.

``submitit`` is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdabench._validate import check_int, check_real
from tdabench.errors import ConfigError, DiskFullError, TdabenchError

__all__ = [
    "KINDS",
    "LaunchError",
    "LaunchReport",
    "LauncherSettings",
    "ShardCall",
    "SlurmSettings",
    "launch_shards",
]

logger = logging.getLogger(__name__)

KINDS = ("slurm", "local", "debug")


class LaunchError(TdabenchError, RuntimeError):
    """Some shards still failed after every retry."""


def _unknown_keys(d: Mapping[str, Any], cls: type, where: str) -> None:
    """Refuse keys that are not fields of ``cls``, naming them, the allowed ones and the fix."""
    names = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(d) - set(names))
    if unknown:
        hint = (
            " (memory is mem_mb, an integer in MB: mem_gb: 4 is mem_mb: 4096)"
            if "mem_gb" in unknown
            else ""
        )
        raise ConfigError(
            f"unknown {where} setting(s) {unknown}; allowed: {names}{hint}. "
            "Fix the key in the config or the profile."
        )


def _name_or_none(where: str, value: Any) -> str | None:
    if value is None or value == "":
        return None  # "let the cluster decide" ('' is the profile's empty placeholder)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string or null, got {value!r}; quote it")
    return value


@dataclass(frozen=True)
class SlurmSettings:
    """Where and how array tasks run on SLURM (all from the config/profile, never hard-coded).

    Units are fixed: memory ``mem_mb`` in MB (an integer), time ``timeout_min`` in minutes.
    ``None`` means "let the cluster's defaults decide" (e.g. the default partition).
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_mb: int = 4096
    timeout_min: int = 60
    constraint: str | None = None
    setup: tuple[str, ...] = ()  # shell lines run before the task (module load ..., source venv)
    additional: Mapping[str, Any] = field(default_factory=dict)  # extra #SBATCH options

    def __post_init__(self) -> None:
        for name in ("partition", "account", "qos", "constraint"):
            value = _name_or_none(f"launcher.slurm.{name}", getattr(self, name))
            object.__setattr__(self, name, value)
        check_int("launcher.slurm.gpus_per_node", self.gpus_per_node, 0)
        check_int("launcher.slurm.cpus_per_task", self.cpus_per_task, 1)
        check_int("launcher.slurm.mem_mb", self.mem_mb, 1)
        check_int("launcher.slurm.timeout_min", self.timeout_min, 1)
        object.__setattr__(self, "setup", tuple(self.setup or ()))
        object.__setattr__(self, "additional", dict(self.additional or {}))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SlurmSettings:
        """From the config's ``launcher.slurm`` block (unknown keys raise ConfigError)."""
        d = dict(d or {})
        _unknown_keys(d, cls, "launcher.slurm")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``from_dict(to_dict())`` gives an equal object."""
        d = dataclasses.asdict(self)
        d["setup"], d["additional"] = list(self.setup), dict(self.additional)
        return d


@dataclass(frozen=True)
class LauncherSettings:
    """Everything :func:`launch_shards` needs besides the work itself.

    Built once (from the run config's ``launcher`` block and the profile's ``groundtruth``
    resources, :func:`tdabench.pipeline.profile.launcher_settings`), validated here, and handed
    to the ground-truth stage as one JSON argument (``tdabench groundtruth --launcher JSON``).
    """

    kind: str = "local"
    folder: str = "logs/submitit"
    max_retries: int = 2
    array_parallelism: int = 8
    poll_s: float = 5.0
    slurm: SlurmSettings = field(default_factory=SlurmSettings)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"launcher.kind={self.kind!r} is not one of {KINDS}; pick one of them."
            )
        if not isinstance(self.folder, str) or not self.folder:
            raise ConfigError(f"launcher.folder={self.folder!r} must be a directory path")
        check_int("launcher.max_retries", self.max_retries, 0)
        check_int("launcher.array_parallelism", self.array_parallelism, 1)
        check_real("launcher.poll_s", self.poll_s, 0.0, strict=True)
        if not isinstance(self.slurm, SlurmSettings):
            raise ConfigError("launcher.slurm must be a SlurmSettings; use from_dict for mappings")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> LauncherSettings:
        """From the config's ``launcher`` block or :meth:`to_dict` (unknown keys raise)."""
        d = dict(d or {})
        _unknown_keys(d, cls, "launcher")
        d["slurm"] = SlurmSettings.from_dict(d.get("slurm"))
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``from_dict(to_dict())`` gives an equal object."""
        return {**dataclasses.asdict(self), "slurm": self.slurm.to_dict()}

    def to_json(self) -> str:
        """The one form that travels from the Snakefile to the stage (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LauncherSettings:
        """Inverse of :meth:`to_json`; ConfigError when ``text`` is not a JSON object."""
        d: Any = None
        with contextlib.suppress(ValueError):
            d = json.loads(text)
        if not isinstance(d, dict):
            raise ConfigError(
                f"--launcher {text[:80]!r} is not a JSON object; pass LauncherSettings.to_json()"
            )
        return cls.from_dict(d)


@dataclass
class LaunchReport:
    """What one :func:`launch_shards` call did."""

    skipped: list[int]  # complete before the call
    completed: list[int]  # completed by this call
    attempts: dict[int, int]  # shard id -> number of submissions
    job_ids: list[str]  # every submitted (array) job id, in order
    seconds: float


class ShardCall:
    """Picklable, requeue-able wrapper of ``fn(shard_id)``.

    Subclasses :class:`submitit.helpers.Checkpointable` lazily (see :func:`_checkpointable`): on
    timeout or preemption SLURM requeues the task and submitit calls ``checkpoint``, which resubmits
    the same ``fn`` with the same shard id.
    """

    def __init__(self, fn: Callable[[int], Any]) -> None:
        self.fn = fn

    def __call__(self, shard_id: int) -> int:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.fn(shard_id)
        return shard_id


def _checkpointable(fn: Callable[[int], Any]) -> ShardCall:
    from tdabench.pipeline._requeue import RequeueableShardCall

    return RequeueableShardCall(fn)


@dataclass
class _DebugJob:
    """Result of running one shard in this process (``kind="debug"``)."""

    job_id: str
    state: str
    log: Path
    error: BaseException | None = None

    def done(self) -> bool:
        return True


def _run_debug(call: ShardCall, shard_ids: Sequence[int], folder: Path) -> list[_DebugJob]:
    import traceback

    jobs = []
    for shard_id in shard_ids:
        log = folder / f"debug-shard{shard_id}.log"
        error = next((j.error for j in jobs if isinstance(j.error, DiskFullError)), None)
        if error is not None:  # the disk is full: the next shards cannot succeed either
            jobs.append(_DebugJob(job_id=f"debug-{shard_id}", state="FAILED", log=log, error=error))
            continue
        try:
            call(shard_id)
            state = "COMPLETED"
            log.unlink(missing_ok=True)
        except Exception as exc:  # a failing shard is reported and retried like a failed task
            state, error = "FAILED", exc
            with contextlib.suppress(OSError):  # the disk may be full
                log.write_text(traceback.format_exc())
            logger.warning("shard %d failed in-process; traceback in %s", shard_id, log)
        jobs.append(_DebugJob(job_id=f"debug-{shard_id}", state=state, log=log, error=error))
    return jobs


def _make_executor(settings: LauncherSettings, folder: Path, name: str) -> Any:
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=settings.kind)
    s = settings.slurm
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": s.timeout_min,
        "cpus_per_task": s.cpus_per_task,
        "mem_gb": s.mem_mb
        / 1024,  # submitit's unit; exact (a power-of-two divisor), MB again in sbatch
        "slurm_array_parallelism": settings.array_parallelism,
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if settings.kind == "slurm":
        if s.partition:
            params["slurm_partition"] = s.partition
        if s.account:
            params["slurm_account"] = s.account
        if s.qos:
            params["slurm_qos"] = s.qos
        if s.constraint:
            params["slurm_constraint"] = s.constraint
        if s.setup:
            params["slurm_setup"] = list(s.setup)
        if s.additional:
            params["slurm_additional_parameters"] = dict(s.additional)
    executor.update_parameters(**params)
    return executor


def _submit(executor: Any, call: ShardCall, shard_ids: Sequence[int], folder: Path) -> list[Any]:
    if executor is None:  # kind="debug": in this process, one shard after the other
        return _run_debug(call, shard_ids, folder)
    import submitit.helpers

    # Submitting from inside a SLURM job (e.g. under Snakemake's slurm executor) must not pass that
    # job's SLURM_* variables on to the array: clean_env hides them during submission.
    with submitit.helpers.clean_env(), _importable_tdabench():
        return list(executor.map_array(call, list(shard_ids)))


@contextlib.contextmanager
def _importable_tdabench() -> Iterator[None]:
    """Make the tasks import the same tdabench as this process, installed or not.

    The submitted environment is captured at submission; this puts the directory holding this
    ``tdabench`` package first on the tasks' PYTHONPATH for that moment only.
    """
    import tdabench

    root = str(Path(tdabench.__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    parts = [p for p in (old or "").split(os.pathsep) if p]
    if parts[:1] == [root]:
        yield
        return
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _log_paths(job: Any) -> str:
    if isinstance(job, _DebugJob):
        return str(job.log)
    try:
        return f"{job.paths.stderr} (stdout: {job.paths.stdout})"
    except Exception:  # pragma: no cover - paths always exist on real jobs
        return "<no log paths>"


def _job_state(job: Any) -> str:
    try:
        return str(job.state)
    except Exception:
        return "UNKNOWN"


def _fatal_error(job: Any) -> DiskFullError | None:
    """A failure no retry can fix (a full disk), from an in-process or a submitit job."""
    if isinstance(job, _DebugJob):
        return job.error if isinstance(job.error, DiskFullError) else None
    try:
        exc = job.exception()
    except Exception:  # no result file (killed, cancelled): retry as usual
        return None
    text = str(exc) if exc is not None else ""
    marker = "DiskFullError: "
    if marker not in text:
        return None
    return DiskFullError(text[text.rindex(marker) + len(marker) :].strip().splitlines()[0])


def _job_done(job: Any) -> bool:
    try:
        return bool(job.done())
    except Exception as exc:  # a broken sacct call must not kill the launcher
        logger.warning("could not query job %s: %s", getattr(job, "job_id", "?"), exc)
        return False


class _ArrayRun:
    """The state of one :func:`launch_shards` call: what waits, what runs, what gave up."""

    def __init__(
        self,
        settings: LauncherSettings,
        fn: Callable[[int], Any],
        todo: list[int],
        name: str,
        report: LaunchReport,
        on_submit: Callable[[list[Any]], None] | None,
    ) -> None:
        self.settings, self.name, self.report, self.on_submit = settings, name, report, on_submit
        self.folder = Path(settings.folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        debug = settings.kind == "debug"
        self.executor = None if debug else _make_executor(settings, self.folder, name)
        self.call = ShardCall(fn) if debug else _checkpointable(fn)
        # SLURM throttles a whole array itself (slurm_array_parallelism), so everything goes out
        # at once; local/debug keep at most `array_parallelism` processes alive.
        self.slots = len(todo) if settings.kind == "slurm" else settings.array_parallelism
        self.queue = list(todo)  # shards waiting for submission (first attempts and retries)
        self.running: dict[int, Any] = {}
        self.last_job: dict[int, Any] = {}
        self.gave_up: list[int] = []

    def submit(self) -> None:
        """Submit as many waiting shards as there are free slots (all of them on SLURM)."""
        free = max(0, self.slots - len(self.running))
        chunk = list(self.queue) if self.settings.kind == "slurm" else self.queue[:free]
        if not chunk:
            return
        del self.queue[: len(chunk)]
        jobs = _submit(self.executor, self.call, chunk, self.folder)
        for shard_id, job in zip(chunk, jobs, strict=True):
            self.running[shard_id] = self.last_job[shard_id] = job
            self.report.attempts[shard_id] = self.report.attempts.get(shard_id, 0) + 1
        array_ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
        self.report.job_ids.extend(array_ids)
        logger.info("%s: submitted shard(s) %s as job(s) %s", self.name, chunk, array_ids)
        if self.on_submit is not None:
            self.on_submit(jobs)

    def poll(self, is_complete: Callable[[int], bool], progress: Any) -> None:
        """Collect finished tasks: complete ones count, others are queued again or given up."""
        if self.settings.kind == "slurm":
            # one sacct call per round for all tasks (the watcher is shared by all jobs)
            next(iter(self.running.values())).watcher.update()
        for shard_id, job in list(self.running.items()):
            if not _job_done(job):
                continue
            del self.running[shard_id]
            if is_complete(shard_id):
                self.report.completed.append(shard_id)
                progress.update(1)
                continue
            fatal = _fatal_error(job)
            if fatal is not None:  # deterministic: retrying cannot succeed
                raise fatal
            tries = self.report.attempts[shard_id]
            logger.warning(
                "%s: shard %d did not complete (job %s, state %s, attempt %d/%d); log: %s",
                self.name,
                shard_id,
                job.job_id,
                _job_state(job),
                tries,
                self.settings.max_retries + 1,
                _log_paths(job),
            )
            (self.queue if tries <= self.settings.max_retries else self.gave_up).append(shard_id)

    def wait(self, is_complete: Callable[[int], bool], total: int) -> None:
        """Submit, then poll every ``poll_s`` until no task runs (retries included)."""
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=self.name, unit="shard", disable=None) as progress:
            self.submit()
            while self.running:
                self.poll(is_complete, progress)
                self.submit()
                if self.running and self.settings.kind != "debug":
                    time.sleep(self.settings.poll_s)

    def error(self) -> LaunchError:
        """The error naming every shard that gave up, with its last job and log."""
        lines = "\n".join(
            f"  shard {i}: job {self.last_job[i].job_id}, log {_log_paths(self.last_job[i])}"
            for i in sorted(self.gave_up)
        )
        return LaunchError(
            f"{self.name}: {len(self.gave_up)} shard(s) still incomplete after "
            f"{self.settings.max_retries + 1} submission(s):\n{lines}\nRead the logs, fix the "
            "cause, and rerun: complete shards are skipped, so only these run again (raise "
            "launcher.max_retries for flaky nodes)."
        )


def launch_shards(
    fn: Callable[[int], Any],
    shard_ids: Iterable[int],
    is_complete: Callable[[int], bool],
    *,
    settings: LauncherSettings | Mapping[str, Any] | None = None,
    name: str = "tdabench-shards",
    on_submit: Callable[[list[Any]], None] | None = None,
) -> LaunchReport:
    """Run ``fn(shard_id)`` for every incomplete shard, as one job array, and wait for all.

    Args:
        fn: picklable callable (module-level function or object) computing one shard and writing
            its output atomically. Its return value is ignored; success is ``is_complete``.
        shard_ids: every shard of the work (complete ones are skipped).
        is_complete: ``is_complete(shard_id) -> bool`` ("its Parquet file exists"), read on the
            submit host before submission and after every task ends.
        settings: :class:`LauncherSettings` or its dict form (:meth:`LauncherSettings.to_dict`).
            ``kind="debug"`` runs in this process (pdb-friendly), ``"local"`` in subprocesses,
            ``"slurm"`` as a job array.
        name: job name shown by ``squeue``.
        on_submit: called with each submission's list of jobs (tests disturb arrays with it).

    Returns:
        A :class:`LaunchReport`.

    Raises:
        LaunchError: some shards are still incomplete after ``1 + max_retries`` submissions; the
            message names them with their log files.
    """
    if not isinstance(settings, LauncherSettings):
        settings = LauncherSettings.from_dict(settings)
    t0 = time.perf_counter()
    ids = sorted({int(i) for i in shard_ids})
    skipped = [i for i in ids if is_complete(i)]
    done_before = set(skipped)
    todo = [i for i in ids if i not in done_before]
    report = LaunchReport(skipped=skipped, completed=[], attempts={}, job_ids=[], seconds=0.0)
    logger.info(
        "%s: %d shards, %d already complete, %d to run (launcher kind=%s)",
        *(name, len(ids), len(skipped), len(todo), settings.kind),
    )
    if todo:
        run = _ArrayRun(settings, fn, todo, name, report, on_submit)
        run.wait(is_complete, len(todo))
        report.completed.sort()
        if run.gave_up:
            report.seconds = time.perf_counter() - t0
            raise run.error()
        logger.info(
            "%s: all %d shards complete in %.1f s", name, len(ids), time.perf_counter() - t0
        )
    report.seconds = time.perf_counter() - t0
    return report
