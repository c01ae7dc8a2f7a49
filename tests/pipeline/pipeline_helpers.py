"""Helpers of the pipeline tests: a scratch copy of the workflow with a tiny config, runners."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def make_workspace(
    dest: Path, attributors=("grad_dot",), lds_subsets=6, loo_indices=4, lr=None, small=True
) -> Path:
    """A copy of the workflow with a tiny configuration (one benchmark, toy-sized ground truth)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "workflow", dest / "workflow", dirs_exist_ok=True)
    shutil.copytree(REPO / "configs", dest / "configs", dirs_exist_ok=True)
    # the Snakefile puts <workspace>/src first on sys.path: link this checkout's package
    (dest / "src").mkdir(exist_ok=True)
    if not (dest / "src" / "tdabench").exists():
        (dest / "src" / "tdabench").symlink_to(REPO / "src" / "tdabench")
    set_config(
        dest,
        attributors=attributors,
        lds_subsets=lds_subsets,
        loo_indices=loo_indices,
        lr=lr,
        small=small,
    )
    return dest


def set_config(
    ws: Path, attributors=("grad_dot",), lds_subsets=6, loo_indices=4, lr=None, small=True
) -> None:
    d = yaml.safe_load((ws / "configs/default.yaml").read_text())
    d.update(benchmarks=["mnist_lr"], attributors=list(attributors))
    d["launcher"].update(kind="debug", poll_s=0.2)
    d["evaluate"]["bootstrap"] = 50
    (ws / "configs/default.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    b = yaml.safe_load((ws / "configs/benchmarks/mnist_lr.yaml").read_text())
    b["groundtruth"]["lds"].update(num_subsets=lds_subsets, shard_size=3)
    b["groundtruth"]["loo"].update(num_indices=loo_indices, shard_size=2)
    b["train"]["ensemble"] = 10
    b["recipe"] = {} if lr is None else {"lr": lr}
    if small:  # real stages: 600 real digits, 3 epochs (seconds per job)
        b["overrides"] = {"n_train": 600, "n_test": 30}
        b["recipe"]["epochs"] = 3
    (ws / "configs/benchmarks/mnist_lr.yaml").write_text(yaml.safe_dump(b, sort_keys=False))


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        )
    return out


def snakemake(ws: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run([str(BIN / "snakemake"), "--cores", "2", *args], ws, timeout)


def jobs_scheduled(ws: Path) -> dict[str, int]:
    """Rule -> count of jobs `snakemake -n` would run (empty when nothing is to be done)."""
    res = snakemake(ws, "-n", "--quiet", "rules")
    out = res.stdout + res.stderr
    counts: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "total"):
            counts[parts[0]] = int(parts[1])
    return counts


def trace_lines(trace: Path) -> list[str]:
    if not trace.exists():
        return []
    lines = trace.read_text().splitlines()
    trace.write_text("")
    return lines
