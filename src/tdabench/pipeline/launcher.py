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
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class SlurmSettings:
    """Where and how array tasks run on SLURM (all from the config/profile, never hard-coded).

    ``None`` means "let the cluster's defaults decide" (e.g. the default partition).
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 4.0
    timeout_min: int = 60
    constraint: str | None = None
    setup: tuple[str, ...] = ()  # shell lines run before the task (module load ..., source venv)
    additional: Mapping[str, Any] = field(default_factory=dict)  # extra #SBATCH options

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SlurmSettings:
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown launcher.slurm setting(s) {unknown}; allowed: {sorted(names)}. "
                "Fix the key in the config or the profile."
            )
        if "setup" in d:
            d["setup"] = tuple(d["setup"] or ())
        if "additional" in d:
            d["additional"] = dict(d["additional"] or {})
        return cls(**d)


@dataclass(frozen=True)
class LauncherSettings:
    """Everything :func:`launch_shards` needs besides the work itself."""

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
        if self.max_retries < 0:
            raise ConfigError(f"launcher.max_retries={self.max_retries} must be >= 0.")
        if self.array_parallelism < 1:
            raise ConfigError(f"launcher.array_parallelism={self.array_parallelism} must be >= 1.")
        if self.poll_s <= 0:
            raise ConfigError(f"launcher.poll_s={self.poll_s} must be > 0.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> LauncherSettings:
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown launcher setting(s) {unknown}; allowed: {sorted(names)}. "
                "Fix the key in the config or the profile."
            )
        d["slurm"] = SlurmSettings.from_dict(d.get("slurm"))
        return cls(**d)


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
        "mem_gb": s.mem_gb,
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
        is_complete: ``is_complete(shard_id) -> bool``, read on the submit host before submission
            and after every task ends (e.g. "the shard's Parquet file exists").
        settings: :class:`LauncherSettings` or its dict form (``kind``, ``folder``,
            ``max_retries``, ``array_parallelism``, ``poll_s``, ``slurm: {partition, account,
            gpus_per_node, cpus_per_task, mem_gb, timeout_min, ...}``). ``kind="debug"`` runs in
            this process (pdb-friendly), ``"local"`` in subprocesses, ``"slurm"`` as a job array.
        name: job name shown by ``squeue``.
        on_submit: called with the list of submitted jobs after each submission (tests use it
            to disturb a running array).

    Returns:
        A :class:`LaunchReport`.

    Raises:
        LaunchError: some shards are still incomplete after ``1 + max_retries`` submissions; the
            message names them with their log files.
    """
    from tqdm.auto import tqdm

    if settings is None:
        settings = LauncherSettings()
    elif not isinstance(settings, LauncherSettings):
        settings = LauncherSettings.from_dict(settings)
    t0 = time.perf_counter()
    ids = sorted({int(i) for i in shard_ids})
    skipped = [i for i in ids if is_complete(i)]
    done_before = set(skipped)
    todo = [i for i in ids if i not in done_before]
    report = LaunchReport(skipped=skipped, completed=[], attempts={}, job_ids=[], seconds=0.0)
    logger.info(
        "%s: %d shards, %d already complete, %d to run (launcher kind=%s)",
        name,
        len(ids),
        len(skipped),
        len(todo),
        settings.kind,
    )
    if not todo:
        report.seconds = time.perf_counter() - t0
        return report

    folder = Path(settings.folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    executor = None if settings.kind == "debug" else _make_executor(settings, folder, name)
    call = ShardCall(fn) if settings.kind == "debug" else _checkpointable(fn)
    # SLURM throttles a whole array itself (slurm_array_parallelism), so everything goes out at
    # once; local/debug keep at most `array_parallelism` processes alive.
    slots = len(todo) if settings.kind == "slurm" else settings.array_parallelism
    queue = list(todo)  # shards waiting for submission (first attempts and retries)
    running: dict[int, Any] = {}
    last_job: dict[int, Any] = {}
    gave_up: list[int] = []

    def submit() -> None:
        chunk = queue[: max(0, slots - len(running))] if settings.kind != "slurm" else list(queue)
        if not chunk:
            return
        del queue[: len(chunk)]
        jobs = _submit(executor, call, chunk, folder)
        for shard_id, job in zip(chunk, jobs, strict=True):
            running[shard_id] = last_job[shard_id] = job
            report.attempts[shard_id] = report.attempts.get(shard_id, 0) + 1
        array_ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
        report.job_ids.extend(array_ids)
        logger.info("%s: submitted shard(s) %s as job(s) %s", name, chunk, array_ids)
        if on_submit is not None:
            on_submit(jobs)

    with tqdm(total=len(todo), desc=name, unit="shard", disable=None) as progress:
        submit()
        while running:
            if settings.kind == "slurm":
                # one sacct call per round for all tasks (the watcher is shared by all jobs)
                next(iter(running.values())).watcher.update()
            for shard_id, job in list(running.items()):
                if not _job_done(job):
                    continue
                del running[shard_id]
                if is_complete(shard_id):
                    report.completed.append(shard_id)
                    progress.update(1)
                    continue
                fatal = _fatal_error(job)
                if fatal is not None:  # deterministic: retrying cannot succeed
                    raise fatal
                state = _job_state(job)
                tries = report.attempts[shard_id]
                logger.warning(
                    "%s: shard %d did not complete (job %s, state %s, attempt %d/%d); log: %s",
                    name,
                    shard_id,
                    job.job_id,
                    state,
                    tries,
                    settings.max_retries + 1,
                    _log_paths(job),
                )
                if tries <= settings.max_retries:
                    queue.append(shard_id)
                else:
                    gave_up.append(shard_id)
            submit()
            if running and settings.kind != "debug":
                time.sleep(settings.poll_s)
    report.seconds = time.perf_counter() - t0
    report.completed.sort()
    if gave_up:
        gave_up.sort()
        lines = "\n".join(
            f"  shard {i}: job {last_job[i].job_id}, log {_log_paths(last_job[i])}" for i in gave_up
        )
        raise LaunchError(
            f"{name}: {len(gave_up)} shard(s) still incomplete after {settings.max_retries + 1} "
            f"submission(s):\n{lines}\nRead the logs, fix the cause, and rerun: complete shards "
            "are skipped, so only these run again (raise launcher.max_retries for flaky nodes)."
        )
    logger.info("%s: all %d shards complete in %.1f s", name, len(ids), report.seconds)
    return report
