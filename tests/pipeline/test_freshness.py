"""Freshness: every output is rebuilt when its inputs change or vanish (issue 16.1, 14.1).

The toy stages (``tests/pipeline/toy_stages.py``) run the real Snakefile in seconds; the trace file says
which stage bodies ran.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import yaml
from pipeline_helpers import (
    BIN,
    REPO,
    jobs_scheduled,
    make_workspace,
    run,
    set_config,
    snakemake,
    trace_lines,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One complete toy run (built once; each test works on a copy with the same mtimes)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("fresh")
    mp.setenv("TDABENCH_STAGES", "toy_stages")
    mp.setenv("TDABENCH_TOY_TRACE", str(root / "trace.txt"))
    mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    mp.setenv("OMP_NUM_THREADS", "1")
    ws = make_workspace(root / "ws", attributors=("grad_dot", "if_cg"))
    snakemake(ws)
    assert jobs_scheduled(ws) == {}
    mp.undo()
    return ws


@pytest.fixture
def ws(built, tmp_path, toy_env):
    ws = tmp_path / "ws"
    shutil.copytree(built, ws, symlinks=True)
    return ws


def _metrics(ws, method):
    return next(ws.glob(f"results/metrics/mnist_lr/{method}.json"))


def test_more_subsets_rerun_the_report(ws, toy_env):
    """num_subsets 6 -> 9: ground truth, merge, every evaluate and the report rerun."""
    before = (ws / "results/report.md").read_text()
    set_config(ws, attributors=("grad_dot", "if_cg"), lds_subsets=9)
    todo = jobs_scheduled(ws)
    assert todo.get("report") == 1 and todo.get("evaluate") == 2, todo
    snakemake(ws)
    ran = trace_lines(toy_env)
    assert "report" in ran and "evaluate mnist_lr if_cg" in ran, ran
    lds = json.loads(_metrics(ws, "if_cg").read_text())["lds"]
    # the report shows the new metrics file's numbers, not the old ones
    row = next(r for r in (ws / "results/report.md").read_text().splitlines() if "| if_cg |" in r)
    assert f"{lds['value']:.3f}" in row and f"[{lds['ci_low']:.3f}, {lds['ci_high']:.3f}]" in row
    assert (ws / "results/report.md").read_text() != before
    assert jobs_scheduled(ws) == {}


@pytest.mark.parametrize(
    ("victim", "expect"),
    [
        ("results/metrics/mnist_lr/grad_dot.json", {"evaluate", "report"}),
        ("results/mnist_lr/plots/grad_dot.json", {"evaluate", "report"}),
        ("results/mnist_lr/scores/grad_dot/*/scores.parquet", {"attribute", "evaluate", "report"}),
        ("results/mnist_lr/groundtruth/lds/*/merged-6.parquet", {"merge", "evaluate", "report"}),
    ],
)
def test_deleted_file_is_rebuilt_while_report_exists(ws, toy_env, victim, expect):
    (path,) = ws.glob(victim)
    path.unlink()
    assert (ws / "results/report.md").exists()
    todo = jobs_scheduled(ws)
    assert expect <= set(todo), todo
    snakemake(ws)
    assert path.exists()
    assert "report" in trace_lines(toy_env)
    assert jobs_scheduled(ws) == {}


def test_changed_hyperparameter_reruns_the_report(ws, toy_env):
    """if_cg's regularization: its attribute, evaluate and the report rerun; grad_dot's do not."""
    f = ws / "configs/attributors/if_cg.yaml"
    a = yaml.safe_load(f.read_text())
    a["params"]["regularization"] = 0.5
    f.write_text(yaml.safe_dump(a))
    assert jobs_scheduled(ws) == {"attribute": 1, "evaluate": 1, "report": 1, "all": 1}
    snakemake(ws)
    assert sorted(trace_lines(toy_env)) == [
        "attribute mnist_lr if_cg",
        "evaluate mnist_lr if_cg",
        "report",
    ]
    html = (ws / "results/report.html").read_text()
    assert (
        "&quot;regularization&quot;: 0.5" in html
    )  # the report says which hyper-parameters it used


def test_edited_metrics_file_reruns_the_report_which_refuses_it(ws, toy_env):
    """A metrics file edited by hand is newer than the report: the report reruns, verifies the
    file's checksum and refuses it, naming the file (never a report of edited numbers)."""
    path = _metrics(ws, "grad_dot")
    m = json.loads(path.read_text())
    m["lds"]["value"] = 0.123456
    path.write_text(json.dumps(m))
    assert jobs_scheduled(ws).get("report") == 1
    res = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "2"], cwd=ws, capture_output=True, text=True
    )
    assert res.returncode != 0
    log = (ws / "logs/report.log").read_text()
    assert "grad_dot.json" in log and "checksum" in log, log
    report = ws / "results/report.md"  # Snakemake removes a failed job's outputs
    assert not report.exists() or "0.123" not in report.read_text()


def _wait_group(pgid, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError("the killed snakemake's jobs did not finish")


def test_rerun_after_sigkill_finishes_the_workflow(built, tmp_path, toy_env):
    """SIGKILL of snakemake at random points while a changed config is being rebuilt (the report
    exists): `--unlock` and ONE rerun finish everything, or fail loudly; never exit 0 with work
    left (issue 14.5). More trials: benchmarks/kill_rerun.py."""
    base = tmp_path / "base"
    shutil.copytree(built, base, symlinks=True)
    set_config(base, attributors=("grad_dot", "if_cg"), lds_subsets=9)
    cmd = [str(BIN / "snakemake"), "--profile", "workflow/profiles/local", "--cores", "2"]
    rng = random.Random(0)
    fractions = [0.05 + 0.9 * i / 9 for i in range(10)]  # spread over the run, then jittered
    probe = tmp_path / "probe"
    shutil.copytree(base, probe, symlinks=True)
    t0 = time.perf_counter()
    run(cmd, probe)
    full = time.perf_counter() - t0
    for i, frac in enumerate(fractions):
        ws = tmp_path / f"t{i}"
        shutil.copytree(base, ws, symlinks=True)
        proc = subprocess.Popen(
            cmd,
            cwd=ws,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(full * min(0.98, frac + rng.uniform(-0.04, 0.04)))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_group(proc.pid)
        run([*cmd, "--unlock"], ws)
        rerun = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=300)
        if rerun.returncode == 0:  # success must mean done
            assert jobs_scheduled(ws) == {}, (i, rerun.stdout[-3000:] + rerun.stderr[-3000:])
            assert "| mnist_lr | if_cg |" in (ws / "results/report.md").read_text(), i
        else:  # or a loud failure
            assert "Error" in rerun.stdout + rerun.stderr, i
        shutil.rmtree(ws)
