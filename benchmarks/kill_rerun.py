"""Kill ``snakemake`` with SIGKILL at random points, then rerun: the rerun must finish the workflow
in one command (or fail loudly), never exit 0 with jobs left undone (issue 14.5).

Each trial copies a prepared workspace (the pipeline's toy stages, one benchmark, a complete run
whose config then changed: one more attributor and more LDS subsets, so the report exists while
work is pending, as in a lab), starts ``snakemake --profile workflow/profiles/local``, sends SIGKILL to the snakemake process alone (its
jobs live on, as after an OOM kill), waits for them, runs ``snakemake --unlock`` and the same
command again, and checks that ``snakemake -n`` then has nothing to do and the report exists.

    .venv/bin/python benchmarks/kill_rerun.py --trials 50 --seed 0
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "pipeline"))

from pipeline_helpers import BIN, make_workspace, set_config  # noqa: E402

SNAKEMAKE = [str(BIN / "snakemake"), "--profile", "workflow/profiles/local", "--cores", "2"]


def toy_env(trace: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TDABENCH_STAGES="toy_stages",
        TDABENCH_TOY_TRACE=str(trace),
        PYTHONPATH=os.pathsep.join(
            [str(REPO / "src"), str(REPO / "tests" / "pipeline"), env.get("PYTHONPATH", "")]
        ),
        OMP_NUM_THREADS="1",
    )
    return env


def _wait_group(pgid: int, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)


def trial(base: Path, work: Path, kill_at: float, env: dict[str, str]) -> dict[str, object]:
    """One kill + rerun; returns what happened (``ok``: finished, or failed loudly)."""
    ws = work / "ws"
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(base, ws, symlinks=True)
    proc = subprocess.Popen(
        SNAKEMAKE,
        cwd=ws,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(kill_at)
    finished_first = proc.poll() is not None
    if not finished_first:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    _wait_group(proc.pid)
    subprocess.run([*SNAKEMAKE, "--unlock"], cwd=ws, env=env, capture_output=True)
    rerun = subprocess.run(SNAKEMAKE, cwd=ws, env=env, capture_output=True, text=True)
    dry = subprocess.run([*SNAKEMAKE, "-n"], cwd=ws, env=env, capture_output=True, text=True)
    done = "Nothing to be done" in dry.stdout + dry.stderr and (ws / "results/report.md").exists()
    return {
        "kill_at": round(kill_at, 2),
        "killed": not finished_first,
        "rerun_rc": rerun.returncode,
        "complete": done,
        # silent: the rerun said success but left work undone
        "ok": done if rerun.returncode == 0 else True,
        "tail": (rerun.stdout + rerun.stderr)[-1500:],
    }


def prepare(root: Path) -> tuple[Path, float, dict[str, str]]:
    """A workspace ready to run, and how long an undisturbed run takes."""
    base = make_workspace(root / "base")
    env = toy_env(root / "trace.txt")
    subprocess.run(SNAKEMAKE, cwd=base, env=env, check=True, capture_output=True)
    set_config(base, attributors=("grad_dot", "if_cg"), lds_subsets=9)
    probe = root / "probe"
    shutil.copytree(base, probe, symlinks=True)
    t0 = time.perf_counter()
    subprocess.run(SNAKEMAKE, cwd=probe, env=env, check=True, capture_output=True)
    return base, time.perf_counter() - t0, env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        base, full, env = prepare(Path(tmp))
        print(f"undisturbed run: {full:.1f} s")
        bad = 0
        for i in range(args.trials):
            r = trial(base, Path(tmp), rng.uniform(0.3, full), env)
            bad += not r["ok"]
            print(
                f"trial {i}: kill at {r['kill_at']} s killed={r['killed']} "
                f"rerun rc={r['rerun_rc']} complete={r['complete']}"
            )
            if not r["ok"]:
                print(r["tail"])
        print(f"{args.trials} trials, {bad} silent incomplete reruns")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
