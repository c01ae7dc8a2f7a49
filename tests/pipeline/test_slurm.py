"""Integration tests on the real single-node SLURM cluster (bash tests/slurm/cluster.sh start).

Skipped automatically when `sinfo` does not answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from pipeline_helpers import BIN, jobs_scheduled, make_workspace, run, trace_lines
from toy_stages import ToyShard, read_toy_shards

from tdabench.pipeline.launcher import launch_shards

pytestmark = pytest.mark.slurm


def _squeue(fmt: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-r", "-o", fmt], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def _cancel_when_running(job_id: str, info: dict | None = None, timeout: float = 120) -> dict:
    """Background thread: wait until `job_id` runs, scancel it, note when (in ``info``)."""
    info = {} if info is None else info

    def go():
        end = time.time() + timeout
        while time.time() < end:
            if f"{job_id}:RUNNING" in _squeue("%i:%T"):
                time.sleep(0.5)
                subprocess.run(["scancel", job_id], check=True)
                info["cancelled_at"] = time.time()
                return
            time.sleep(0.3)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    info["thread"] = t
    return info


def test_job_array_skip_and_scancel_resubmit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shard = ToyShard(str(tmp_path / "out"), seed=7, sleep_s=8)
    ToyShard(str(tmp_path / "out"), seed=7)(0)  # shard 0 complete before the launch
    settings = {
        "kind": "slurm",
        "folder": str(tmp_path / "logs"),
        "poll_s": 1,
        "array_parallelism": 2,
        "max_retries": 2,
        "slurm": {"mem_mb": 256, "timeout_min": 5, "cpus_per_task": 1},
    }
    cancel: dict = {}
    detected: dict = {}

    def on_submit(jobs):
        if not cancel:  # first submission: one array; cancel its second task once it runs
            assert len({j.job_id.split("_")[0] for j in jobs}) == 1, "expected ONE job array"
            _cancel_when_running(jobs[1].job_id, cancel)
        elif "at" not in detected:
            detected["at"] = time.time()

    rep = launch_shards(shard, range(4), shard.is_complete, settings=settings, on_submit=on_submit)
    assert rep.skipped == [0] and rep.completed == [1, 2, 3]
    assert rep.attempts[2] == 2 and rep.attempts[1] == 1 and rep.attempts[3] == 1
    assert "cancelled_at" in cancel
    print(f"scancel -> resubmission: {detected['at'] - cancel['cancelled_at']:.1f} s")
    # the disturbed run equals an undisturbed one
    clean = ToyShard(str(tmp_path / "clean"), seed=7)
    for i in range(4):
        clean(i)
    assert read_toy_shards(tmp_path / "out") == read_toy_shards(tmp_path / "clean")


def _slow_shards(ws):
    """More epochs, so that a shard runs long enough (tens of seconds) to be cancelled mid-run."""
    import yaml

    path = ws / "configs/benchmarks/mnist_lr.yaml"
    b = yaml.safe_load(path.read_text())
    b["recipe"]["epochs"] = 600  # the batched fast path needs about 0.7 s per 100 epochs of a shard
    path.write_text(yaml.safe_dump(b, sort_keys=False))
    return ws


def test_groundtruth_stage_scancel_matches_undisturbed(tmp_path, real_env, monkeypatch):
    """The real `tdabench groundtruth` stage (retraining on real MNIST digits) through submitit
    on SLURM, with one array task cancelled while it runs: it is resubmitted and the merged
    ground truth equals an undisturbed in-process run's."""
    ws = _slow_shards(make_workspace(tmp_path / "ws", lds_subsets=9))
    py = str(BIN / "python")
    cmd = [
        py,
        "-m",
        "tdabench.pipeline",
        "groundtruth",
        "--benchmark",
        "mnist_lr",
        "--kind",
        "lds",
        "--set",
        "launcher.kind=slurm",
        "--set",
        "launcher.poll_s=1",
        "--set",
        "launcher.slurm.mem_mb=256",
        "--set",
        "launcher.array_parallelism=2",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # find the array's task 1 and cancel it while it runs
        end = time.time() + 120
        task = None
        while time.time() < end and task is None:
            ids = [
                i
                for i in _squeue("%i:%j")
                if i.endswith(":tdabench-shards") or i.endswith(":gt-lds")
            ]
            task = next((i.split(":")[0] for i in ids if i.split(":")[0].endswith("_1")), None)
            time.sleep(0.3)
        assert task, "the array never appeared in squeue"
        info = _cancel_when_running(task)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "cancelled_at" in info
    (complete,) = ws.glob("results/mnist_lr/groundtruth/lds/*/complete-9.json")
    summary = json.loads(complete.with_name(complete.name + ".run.json").read_text())  # run facts
    assert summary["ran"] == [0, 1, 2] and summary["attempts"]["1"] == 2, summary
    # merge, then compare with an undisturbed in-process run of the same stage
    run([py, "-m", "tdabench.pipeline", "merge", "--benchmark", "mnist_lr", "--kind", "lds"], ws)
    ref = _slow_shards(make_workspace(tmp_path / "ref", lds_subsets=9))
    for stage in ("groundtruth", "merge"):
        run(
            [
                py,
                "-m",
                "tdabench.pipeline",
                stage,
                "--benchmark",
                "mnist_lr",
                "--kind",
                "lds",
                "--set",
                "launcher.kind=debug",
            ],
            ref,
        )
    import pyarrow.parquet as pq

    (m1,) = ws.glob("results/mnist_lr/groundtruth/lds/*/merged-9.parquet")
    (m2,) = ref.glob("results/mnist_lr/groundtruth/lds/*/merged-9.parquet")
    assert m1.relative_to(ws) == m2.relative_to(ref)
    assert pq.read_table(m1).equals(pq.read_table(m2))


@pytest.mark.slow
def test_snakemake_profile_slurm(tmp_path, toy_env, monkeypatch):
    """`tdabench install-profile` + `snakemake --profile slurm`, exactly as documented."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ws = make_workspace(tmp_path / "ws")
    py = str(BIN / "python")
    run(
        [
            py,
            "-m",
            "tdabench.pipeline",
            "install-profile",
            "--account",
            "tdabench",
            "--partition",
            os.environ.get("TDABENCH_SLURM_PARTITION", "debug"),
            "--gpus-per-node",
            "0",
            "--cpus-per-task",
            "1",
            "--mem-gb",
            "0.25",
            "--timeout-min",
            "10",
            "--jobs",
            "4",
            "--array-parallelism",
            "2",
        ],
        ws,
    )
    prof = tmp_path / "home/.config/snakemake/slurm/config.yaml"
    # poll SLURM sooner than a lab would (the plugin's default first check is after 40 s)
    prof.write_text(prof.read_text().replace("status-checks: 20", "status-checks: 3"))
    t0 = time.time()
    run([str(BIN / "snakemake"), "--profile", "slurm"], ws, timeout=600)
    print(f"snakemake --profile slurm (toy): {time.time() - t0:.0f} s")
    ran = trace_lines(toy_env)
    assert "report" in ran and any(r.startswith("groundtruth") for r in ran)
    log = next(ws.glob("logs/mnist_lr/groundtruth-lds-*.log")).read_text()
    assert "launcher kind=slurm" in log
    assert jobs_scheduled(ws) == {}


def _install_profile(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "tdabench.pipeline",
            "install-profile",
            "--account",
            "tdabench",
            "--partition",
            os.environ.get("TDABENCH_SLURM_PARTITION", "debug"),
            "--dest",
            str(tmp_path / "prof"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_install_profile_refuses_an_unsatisfiable_request(tmp_path):
    """The profile's defaults (4 CPUs, 16 GB, 1 GPU) on a partition that cannot give them would
    stay PENDING without a word: install-profile refuses, naming each resource."""
    res = _install_profile(tmp_path, "--cpus-per-task", "4096", "--mem-gb", "100000")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "--cpus-per-task 4096" in res.stderr and "--mem-gb 100000" in res.stderr
    assert "--gpus-per-node 1" in res.stderr  # the default GPU, on a partition without GPUs
    assert not (tmp_path / "prof/config.yaml").exists()
    res = _install_profile(tmp_path, "--partition", "no_such_partition")
    assert res.returncode == 2 and "does not exist" in res.stderr and "debug" in res.stderr
    ok = _install_profile(
        tmp_path,
        "--gpus-per-node",
        "0",
        "--cpus-per-task",
        "1",
        "--mem-gb",
        "0.25",
        "--timeout-min",
        "5",
    )
    assert ok.returncode == 0, ok.stderr
    assert "slurm-status-command: squeue" in (tmp_path / "prof/config.yaml").read_text()


def _sleepy_workflow(tmp_path):
    """One rule that sleeps on SLURM, run with the profile install-profile writes."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "Snakefile").write_text(
        'rule all:\n    input: "a.txt"\n\n'
        'rule a:\n    output: "a.txt"\n    shell: "sleep 60; touch {output}"\n'
    )
    res = _install_profile(
        tmp_path,
        "--gpus-per-node",
        "0",
        "--cpus-per-task",
        "1",
        "--mem-gb",
        "0.25",
        "--timeout-min",
        "5",
    )
    assert res.returncode == 0, res.stderr
    prof = tmp_path / "prof/config.yaml"
    prof.write_text(prof.read_text().replace("status-checks: 20", "status-checks: 3"))
    return ws


def _running_jobs() -> list[str]:
    return [i.split(":")[0] for i in _squeue("%i:%T") if i.endswith(":RUNNING")]


def _wait_running(exclude=(), timeout=120) -> str:
    end = time.time() + timeout
    while time.time() < end:
        new = [j for j in _running_jobs() if j not in exclude]
        if new:
            return new[0]
        time.sleep(0.5)
    raise AssertionError("no SLURM job started")


@pytest.mark.slow
def test_scancel_of_executor_job_is_retried_then_fails_loudly(tmp_path):
    """scancel of a Snakemake (executor plugin) job: detected, retried once (retries: 1), and the
    second cancel fails the run with the SLURM state, instead of hanging at "1 of 2 steps"."""
    ws = _sleepy_workflow(tmp_path)
    proc = subprocess.Popen(
        [str(BIN / "snakemake"), "--profile", str(tmp_path / "prof")],
        cwd=ws,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A suite started in the background of a non-interactive shell inherits SIGINT ignored,
        # and Python then never turns SIGINT into KeyboardInterrupt: give Snakemake the signal
        # disposition a user's terminal gives it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        first = _wait_running()
        subprocess.run(["scancel", first], check=True)
        second = _wait_running(exclude=(first,))  # the retry
        subprocess.run(["scancel", second], check=True)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    assert f"SLURM-job '{first}' failed, SLURM status is: 'CANCELLED'" in out, out
    assert f"SLURM-job '{second}' failed" in out and "Trying to restart" in out, out
    assert not (ws / "a.txt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_snakemake_stops_cleanly_on_a_signal(tmp_path, sig):
    """SIGINT / SIGTERM: Snakemake cancels its SLURM jobs and exits, without SIGKILL or --unlock."""
    ws = _sleepy_workflow(tmp_path)
    proc = subprocess.Popen(
        [str(BIN / "snakemake"), "--profile", str(tmp_path / "prof")],
        cwd=ws,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A suite started in the background of a non-interactive shell inherits SIGINT ignored,
        # and Python then never turns SIGINT into KeyboardInterrupt: give Snakemake the signal
        # disposition a user's terminal gives it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        job = _wait_running()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    assert job not in _running_jobs(), f"job {job} still runs after {sig!r}"
    assert not (ws / ".snakemake/locks").exists() or not any((ws / ".snakemake/locks").iterdir())
