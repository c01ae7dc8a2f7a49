"""Fault campaign: damage every output the pipeline writes, kill its stages, race its writers,
fill its disk, and classify what the pipeline does about it.

A tiny real run (120 MNIST digits of ``mnist_lr_smoke``, the real stages, debug launcher) is
built once as the reference. Each case copies it, injects one fault, runs the consumers of the
damaged file (or reruns the killed stage) down to the metrics JSON, and is classified:

* **handled** -- a typed tdabench error that names the damaged file (or its directory), or a
  result byte-identical to the reference (the damage was repaired, e.g. a shard recomputed);
* **weak** -- an error that is not a typed tdabench error, or one that does not name the file;
* **silent-wrong** -- no error, but a result that differs from the reference;
* **unsafe** -- a file outside the run was read, or a pickle was executed.

Fault kinds: random bit flips and truncations of every output type (data record, noisy labels,
models manifest, model checkpoints, store manifest, shards, completion record, merged ground
truth, scores, self-scores, metrics, curves); SIGKILL at random points of the groundtruth, train
and attribute stages followed by a rerun; two concurrent writers of the same outputs; a full disk
(a small tmpfs when it can be mounted, else ``RLIMIT_FSIZE``, which fails writes the same way);
tampered-but-restamped inputs (other benchmark, other kind, reordered rows, missing columns);
manifest names escaping their directory; pickles in place of checkpoints.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/fault_campaign.py \\
        [--device cpu] [--seed 0] [--flips 6] [--truncations 3] [--kills 6] \\
        [--json benchmarks/results/fault_campaign.json] [--md benchmarks/results/fault_campaign.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "faults"))  # the tiny run of the fault tests

from fault_helpers import METHOD, B, Run, tiny_config  # noqa: E402

from tdabench.errors import TdabenchError  # noqa: E402

OUTCOMES = ("handled", "weak", "silent-wrong", "unsafe")


@dataclass
class Case:
    """One fault and what came of it."""

    kind: str
    target: str
    detail: str
    outcome: str = ""
    note: str = ""


@dataclass
class Campaign:
    """The reference run and the cases tried against copies of it."""

    base: Path
    device: str
    rng: random.Random
    cases: list[Case] = field(default_factory=list)

    def run_copy(self, tmp: Path) -> Run:
        root = tmp / "results"
        shutil.copytree(self.base, root, symlinks=True)
        return Run(tiny_config(root), root)

    def reference_metrics(self) -> bytes:
        return Path(Run(tiny_config(self.base), self.base).p["metrics"][METHOD]).read_bytes()


# ----------------------------------------------------------------------------- classification


def _names(exc: BaseException, path: Path) -> bool:
    text = str(exc)
    return path.name in text or path.parent.name in text


def classify(action: Callable[[], Any], path: Path, check: Callable[[], bool]) -> tuple[str, str]:
    """Run the consumers; classify by the error raised, else by comparing the result."""
    try:
        action()
    except TdabenchError as exc:
        kind = type(exc).__name__
        return (
            ("handled", kind) if _names(exc, path) else ("weak", f"{kind} without the file: {exc}")
        )
    except Exception as exc:  # a raw traceback is what the reliability issue calls weak
        return "weak", f"{type(exc).__name__}: {exc}"
    return ("handled", "repaired or harmless") if check() else ("silent-wrong", "result differs")


# ----------------------------------------------------------------------------- the outputs


def outputs(run: Run) -> dict[str, tuple[Path, Callable[[Run], None]]]:
    """``{type: (a file of that type, its consumers down to the metrics)}``."""
    p = run.p
    models = Path(p["models"])
    lds = Path(p["groundtruth"]["lds"]["dir"])

    def evaluate(r: Run) -> None:
        r.evaluate()

    def attribute(r: Run) -> None:
        r.attribute(device=_DEVICE)
        r.evaluate()

    def train(r: Run) -> None:
        r.train(device=_DEVICE)
        attribute(r)

    def groundtruth(r: Run) -> None:
        r.groundtruth("lds")
        r.merge("lds")
        r.evaluate()

    def merge(r: Run) -> None:
        r.merge("lds")
        r.evaluate()

    def verify(r: Run, f: Path) -> None:
        from tdabench import _io

        _io.verify_output(f)

    metrics = Path(p["metrics"][METHOD])
    curves = run.results / B / "plots" / f"{METHOD}.json"
    return {
        "data record (meta.json)": (Path(p["meta"]), attribute),
        "noisy labels (parquet)": (Path(p["noisy"]), attribute),
        "models manifest (json)": (models / "manifest.json", attribute),
        "model checkpoint (safetensors)": (models / "clean-0-ckpt1.safetensors", attribute),
        "noisy-model checkpoint (safetensors)": (models / "noisy-0-ckpt1.safetensors", attribute),
        "store manifest (json)": (lds / "manifest.json", groundtruth),
        "store shard (parquet)": (sorted((lds / "shards").glob("*.parquet"))[0], groundtruth),
        "completion record (json)": (Path(p["groundtruth"]["lds"]["complete"]), merge),
        "merged ground truth (parquet)": (Path(p["groundtruth"]["lds"]["merged"]), evaluate),
        "scores (parquet)": (Path(p["scores"][METHOD]), evaluate),
        "self-scores (parquet)": (Path(p["self_scores"][METHOD]), evaluate),
        "metrics (json)": (metrics, lambda r, f=metrics: verify(r, f)),
        "curves (json)": (curves, lambda r, f=curves: verify(r, f)),
    }


_DEVICE = "cpu"


def _same_as_reference(c: Campaign, run: Run, damaged: Path) -> Callable[[], bool]:
    """Metrics and curves have no consumer but verification: compare the file itself; every
    other output is judged by the metrics it leads to."""

    def check() -> bool:
        if "metrics" in damaged.parts or "plots" in damaged.parts:
            return damaged.read_bytes() == (c.base / damaged.relative_to(run.results)).read_bytes()
        return Path(run.p["metrics"][METHOD]).read_bytes() == c.reference_metrics()

    return check


def damage_cases(c: Campaign, kind: str, count: int) -> None:
    """``count`` random bit flips (``kind="flip"``) or truncations of every output type."""
    with tempfile.TemporaryDirectory() as d:
        types = list(outputs(c.run_copy(Path(d) / "probe")))
    for t in types:
        for i in range(count):
            with tempfile.TemporaryDirectory() as d:
                run = c.run_copy(Path(d))
                path, consumers = outputs(run)[t]
                data = bytearray(path.read_bytes())
                if kind == "flip":
                    at = c.rng.randrange(len(data))
                    data[at] ^= 1 << c.rng.randrange(8)
                    detail = f"bit flip at byte {at} of {len(data)}"
                else:
                    at = c.rng.randrange(len(data))
                    data = data[:at]
                    detail = f"truncated to {at} of {len(path.read_bytes())} bytes"
                path.write_bytes(bytes(data))
                outcome, note = classify(
                    lambda run=run, consumers=consumers: consumers(run),
                    path,
                    _same_as_reference(c, run, path),
                )
                c.cases.append(Case(kind, t, f"{detail} (#{i})", outcome, note))


# ----------------------------------------------------------------------------- subprocess stages


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    env.pop("TDABENCH_STAGES", None)
    env.update(extra or {})
    return env


def stage_argv(run: Run, stage: str) -> list[str]:
    """The CLI command of ``stage`` on ``run`` (as the Snakemake rules call it)."""
    p = run.p
    py = [sys.executable, "-m", "tdabench.pipeline", stage, "--benchmark", B]
    dev = ["--device", _DEVICE]
    if stage == "prepare":
        return [*py, "--spec", json.dumps(run.spec("prepare")), "--out-dir", p["data"]]
    if stage == "train":
        spec = json.dumps(run.spec("train"))
        return [*py, "--spec", spec, "--data", p["data"], "--out-dir", p["models"], *dev]
    if stage == "groundtruth":
        g = p["groundtruth"]["lds"]
        spec = json.dumps(run.spec("groundtruth", kind="lds"))
        return [
            *py,
            "--spec",
            spec,
            "--count",
            str(g["count"]),
            "--store",
            g["dir"],
            "--out",
            g["complete"],
            "--launcher",
            json.dumps({"kind": "debug", "folder": "submitit", "max_retries": 0}),
            *dev,
        ]
    spec = json.dumps(run.spec("attribute", method=METHOD))
    return [
        *py,
        "--spec",
        spec,
        "--data",
        p["data"],
        "--models",
        p["models"],
        "--out",
        p["scores"][METHOD],
        "--out-self",
        p["self_scores"][METHOD],
        "--metrics",
        "lds,loo,auc",
        *dev,
    ]


def _stage_outputs(run: Run, stage: str) -> list[Path]:
    p = run.p
    if stage == "prepare":
        return [Path(p["noisy"]), Path(p["meta"])]
    if stage == "train":
        return [
            *sorted(Path(p["models"]).glob("*.safetensors")),
            Path(p["models"]) / "manifest.json",
        ]
    if stage == "groundtruth":
        return sorted(Path(p["groundtruth"]["lds"]["dir"]).glob("shards/*.parquet"))
    return [Path(p["scores"][METHOD]), Path(p["self_scores"][METHOD])]


def _remove_outputs(run: Run, stage: str) -> None:
    p = run.p
    target = {
        "prepare": p["data"],
        "train": p["models"],
        "groundtruth": p["groundtruth"]["lds"]["dir"],
        "attribute": str(Path(p["scores"][METHOD]).parent),
    }[stage]
    shutil.rmtree(target)


def _identical_outputs(c: Campaign, run: Run, stage: str) -> bool:
    files = _stage_outputs(run, stage)
    ref = [c.base / f.relative_to(run.results) for f in files]
    return bool(files) and all(
        r.exists() and f.read_bytes() == r.read_bytes() for f, r in zip(files, ref, strict=True)
    )


def kill_cases(c: Campaign, count: int) -> None:
    """SIGKILL a stage at a random moment, rerun it, and compare its outputs with the reference."""
    for stage in ("groundtruth", "train", "attribute"):
        for i in range(count):
            with tempfile.TemporaryDirectory() as d:
                run = c.run_copy(Path(d))
                _remove_outputs(run, stage)
                proc = subprocess.Popen(
                    stage_argv(run, stage),
                    cwd=run.results,
                    env=_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                delay = c.rng.uniform(0.5, 9.0)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=delay)
                killed = proc.poll() is None
                if killed:
                    proc.send_signal(signal.SIGKILL)
                proc.wait()
                rerun = subprocess.run(
                    stage_argv(run, stage),
                    cwd=run.results,
                    env=_env(),
                    capture_output=True,
                    text=True,
                )
                detail = (
                    f"SIGKILL after {delay:.1f} s" if killed else f"finished before {delay:.1f} s"
                )
                if rerun.returncode != 0:
                    outcome, note = "weak", f"rerun failed: {rerun.stderr.strip()[-300:]}"
                elif _identical_outputs(c, run, stage):
                    outcome, note = "handled", "rerun completed; outputs identical"
                else:
                    outcome, note = "silent-wrong", "rerun outputs differ from the reference"
                c.cases.append(Case("kill", stage, f"{detail} (#{i})", outcome, note))


def concurrent_cases(c: Campaign) -> None:
    """Two writers of the same outputs at once: both finish, the outputs equal the reference."""
    for stage in ("prepare", "train", "groundtruth", "attribute"):
        with tempfile.TemporaryDirectory() as d:
            run = c.run_copy(Path(d))
            _remove_outputs(run, stage)
            procs = [
                subprocess.Popen(
                    stage_argv(run, stage),
                    cwd=run.results,
                    env=_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            errs = [pr.communicate()[1] for pr in procs]
            rcs = [pr.returncode for pr in procs]
            if any(rcs):
                outcome, note = (
                    "weak",
                    f"writer failed: {errs[rcs.index(next(r for r in rcs if r))][-300:]}",
                )
            elif _identical_outputs(c, run, stage):
                outcome, note = "handled", "both writers finished; outputs identical"
            else:
                outcome, note = "silent-wrong", "outputs differ"
            c.cases.append(Case("concurrent", stage, "two writers at once", outcome, note))


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return res.returncode == 0


def disk_full_cases(c: Campaign) -> None:
    """Each stage on a full disk: exit 2, 'disk full at PATH', no partial output, no retry."""
    limiter = (
        "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)); "
        "sys.argv = ['tdabench'] + sys.argv[1:]; runpy.run_module('tdabench.pipeline', run_name='__main__')"
    )
    for stage in ("prepare", "train", "groundtruth", "attribute"):
        with tempfile.TemporaryDirectory() as d:
            run = c.run_copy(Path(d))
            _remove_outputs(run, stage)
            mnt = Path(d) / "mnt"
            how = "RLIMIT_FSIZE 1 KiB"
            argv = [sys.executable, "-c", limiter, *stage_argv(run, stage)[3:]]
            if stage == "attribute" and _tmpfs(mnt, "16k"):
                how = "tmpfs of 16 KiB"
                argv = stage_argv(run, stage)
                argv[argv.index("--out") + 1] = str(mnt / "scores.parquet")
                argv[argv.index("--out-self") + 1] = str(mnt / "self.parquet")
            res = subprocess.run(argv, cwd=run.results, env=_env(), capture_output=True, text=True)
            partial = [f for f in _stage_outputs(run, stage) if f.exists()]
            with contextlib.suppress(Exception):
                subprocess.run(["umount", str(mnt)], capture_output=True)
            if res.returncode == 2 and "disk full at" in res.stderr and not partial:
                outcome, note = "handled", "exit 2, 'disk full at PATH', nothing partial"
            elif res.returncode == 0:
                outcome, note = "silent-wrong", "succeeded on a full disk?"
            else:
                outcome, note = "weak", f"rc {res.returncode}: {res.stderr.strip()[-300:]}"
            c.cases.append(Case("disk-full", stage, how, outcome, note))


# ----------------------------------------------------------------------------- tampering


def _restamp_scores(run: Run, fn: Callable[[Any], Any]) -> Path:
    from tdabench.pipeline.io import read_scores, write_scores

    p = Path(run.p["scores"][METHOD])
    s, meta = read_scores(p)
    write_scores(p, fn(s), {"method": meta["method"]}, meta["provenance"])
    return p


def _restamp_parquet(
    path: Path, fn: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]
) -> Path:
    from tdabench import _io

    table, meta = _io.read_parquet(path)
    prov = json.loads(meta.pop("provenance", "{}"))
    extra = {k: v for k, v in meta.items() if k not in ("version", "rows", "sha256")}
    table, prov = fn(table, prov)
    _io.write_parquet(path, table, extra, prov)
    return path


def tamper_cases(c: Campaign) -> None:
    """Careful forgeries with valid checksums: provenance and shapes must still catch them."""
    import numpy as np
    import pyarrow as pa

    def nan_columns(s: Any) -> Any:
        s[:, :3] = np.nan
        return s

    def other_benchmark(t: Any, prov: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return t, {**prov, "benchmark": "mnist_mlp_smoke"}

    def other_data(t: Any, prov: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return t, {**prov, "data": "0" * 64}

    def other_kind(t: Any, prov: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return t, {**prov, "kind": "lds"}

    def reorder(t: Any, prov: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return t.take(pa.array(np.random.default_rng(0).permutation(t.num_rows))), prov

    forgeries: list[tuple[str, Callable[[Run], Path]]] = [
        ("scores with 10 of 12 test columns", lambda r: _restamp_scores(r, lambda s: s[:, :10])),
        ("NaN scores in 3 columns (not allowed)", lambda r: _restamp_scores(r, nan_columns)),
        (
            "scores rows reordered, restamped",
            lambda r: _restamp_parquet(Path(r.p["scores"][METHOD]), reorder),
        ),
        (
            "another benchmark's LOO ground truth",
            lambda r: _restamp_parquet(Path(r.p["groundtruth"]["loo"]["merged"]), other_benchmark),
        ),
        (
            "another split's LDS ground truth",
            lambda r: _restamp_parquet(Path(r.p["groundtruth"]["lds"]["merged"]), other_data),
        ),
        (
            "LOO ground truth labelled LDS",
            lambda r: _restamp_parquet(Path(r.p["groundtruth"]["loo"]["merged"]), other_kind),
        ),
        (
            "another split's noisy labels",
            lambda r: _restamp_parquet(Path(r.p["noisy"]), other_data),
        ),
        (
            "self-scores of another benchmark",
            lambda r: _restamp_parquet(Path(r.p["self_scores"][METHOD]), other_benchmark),
        ),
    ]
    for name, forge in forgeries:
        with tempfile.TemporaryDirectory() as d:
            run = c.run_copy(Path(d))
            path = forge(run)
            outcome, note = classify(run.evaluate, path, _same_as_reference(c, run, path))
            c.cases.append(Case("tamper", name, "checksum valid", outcome, note))


def _evil_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    return pickle.dumps(Evil())


def unsafe_cases(c: Campaign) -> None:
    """Names escaping their directory and pickles in place of checkpoints: never read, never run."""
    from tdabench import _io

    escapes: list[tuple[str, Callable[[Run, Path], Path]]] = []

    def manifest_name(name: str) -> Callable[[Run, Path], Path]:
        def go(run: Run, outside: Path) -> Path:
            mp = Path(run.p["models"]) / "manifest.json"
            man = json.loads(mp.read_text())
            man["files"]["clean"][0][-1] = name.format(outside=outside)
            _io.write_json(mp, {k: v for k, v in man.items() if k != "sha256"})
            return mp

        return go

    def symlink(run: Run, outside: Path) -> Path:
        models = Path(run.p["models"])
        name = json.loads((models / "manifest.json").read_text())["files"]["clean"][0][-1]
        shutil.copy(models / name, outside)
        (models / name).unlink()
        (models / name).symlink_to(outside)
        return models / name

    escapes += [
        ("models manifest name '../..'", manifest_name("../../outside.safetensors")),
        ("models manifest absolute name", manifest_name("{outside}")),
        ("model checkpoint symlinked outside", symlink),
    ]
    for name, make in escapes:
        with tempfile.TemporaryDirectory() as d:
            run = c.run_copy(Path(d))
            outside = Path(d) / "outside.safetensors"
            shutil.copy(Path(run.p["models"]) / "clean-1-ckpt1.safetensors", outside)
            path = make(run, outside)
            before = outside.stat().st_atime_ns
            outcome, note = classify(
                lambda run=run: run.attribute(device=_DEVICE), path, lambda: False
            )
            if outcome != "handled" or "UnsafePath" not in note:
                outcome, note = "unsafe", f"read outside the run? {note}"
            c.cases.append(Case("unsafe", name, f"atime {before}", outcome, note))


def pickle_cases(c: Campaign) -> None:
    """A malicious pickle in place of a checkpoint, scores or a shard: refused, never run."""
    for target in ("model checkpoint", "noisy-model checkpoint", "scores", "store shard"):
        with tempfile.TemporaryDirectory() as d:
            run = c.run_copy(Path(d))
            files = outputs(run)
            key = {
                "model checkpoint": "model checkpoint (safetensors)",
                "noisy-model checkpoint": "noisy-model checkpoint (safetensors)",
                "scores": "scores (parquet)",
                "store shard": "store shard (parquet)",
            }[target]
            path, consumers = files[key]
            marker = Path(d) / "PWNED"
            path.write_bytes(_evil_pickle(marker))
            outcome, note = classify(
                lambda run=run, consumers=consumers: consumers(run),
                path,
                _same_as_reference(c, run, path),
            )
            if marker.exists():
                outcome, note = "unsafe", "the pickle ran"
            c.cases.append(Case("pickle", target, "malicious pickle in place", outcome, note))


# ----------------------------------------------------------------------------- main


def build_reference(root: Path, device: str) -> Path:
    results = root / "results"
    run = Run(tiny_config(results), results)
    run.prepare()
    run.train(device=device)
    for kind in ("lds", "loo"):
        run.groundtruth(kind)
        run.merge(kind)
    run.attribute(device=device)
    run.evaluate()
    return results


def summarize(cases: list[Case]) -> dict[str, Any]:
    counts = Counter(c.outcome for c in cases)
    by_kind: dict[str, Counter[str]] = {}
    for c in cases:
        by_kind.setdefault(c.kind, Counter())[c.outcome] += 1
    return {
        "tried": len(cases),
        **{o: counts.get(o, 0) for o in OUTCOMES},
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "types_flipped": sorted({c.target for c in cases if c.kind == "flip"}),
        "types_truncated": sorted({c.target for c in cases if c.kind == "truncate"}),
    }


def write_results(
    summary: dict[str, Any], cases: list[Case], args: argparse.Namespace, secs: float
) -> None:
    doc = {
        "summary": summary,
        "seconds": round(secs, 1),
        "device": args.device,
        "seed": args.seed,
        "cases": [c.__dict__ for c in cases],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "# Fault campaign",
        "",
        f"`python benchmarks/fault_campaign.py --device {args.device} --seed {args.seed}` "
        f"({secs / 60:.1f} min). A tiny real run (120 MNIST digits, real stages) is damaged "
        "one fault at a time; each case runs the consumers down to the metrics.",
        "",
        f"**{summary['tried']} tried: {summary['handled']} handled, {summary['weak']} weak, "
        f"{summary['silent-wrong']} silent-wrong, {summary['unsafe']} unsafe.**",
        "",
        "| fault | handled | weak | silent-wrong | unsafe |",
        "|---|---|---|---|---|",
    ]
    for k, v in summary["by_kind"].items():
        lines.append(f"| {k} | " + " | ".join(str(v.get(o, 0)) for o in OUTCOMES) + " |")
    bad = [c for c in cases if c.outcome != "handled"]
    if bad:
        lines += ["", "Not handled:", ""] + [
            f"- {c.kind} / {c.target} / {c.detail}: {c.outcome} ({c.note[:200]})" for c in bad
        ]
    lines += [
        "",
        f"Output types under bit flips and truncations: {', '.join(summary['types_flipped'])}.",
    ]
    Path(args.md).write_text("\n".join(lines) + "\n")


def main() -> None:
    global _DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (the stages' --device)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flips", type=int, default=6, help="bit flips per output type")
    ap.add_argument("--truncations", type=int, default=3, help="truncations per output type")
    ap.add_argument("--kills", type=int, default=6, help="kill trials per killed stage")
    ap.add_argument("--json", default=str(REPO / "benchmarks/results/fault_campaign.json"))
    ap.add_argument("--md", default=str(REPO / "benchmarks/results/fault_campaign.md"))
    args = ap.parse_args()
    _DEVICE = args.device
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        c = Campaign(build_reference(Path(d), args.device), args.device, random.Random(args.seed))
        for step in (
            lambda: damage_cases(c, "flip", args.flips),
            lambda: damage_cases(c, "truncate", args.truncations),
            lambda: tamper_cases(c),
            lambda: unsafe_cases(c),
            lambda: pickle_cases(c),
            lambda: kill_cases(c, args.kills),
            lambda: concurrent_cases(c),
            lambda: disk_full_cases(c),
        ):
            step()
            s = summarize(c.cases)
            print(
                f"{s['tried']} tried: {s['handled']} handled / {s['weak']} weak / "
                f"{s['silent-wrong']} silent-wrong / {s['unsafe']} unsafe",
                flush=True,
            )
    secs = time.perf_counter() - t0
    summary = summarize(c.cases)
    write_results(summary, c.cases, args, secs)
    for case in c.cases:
        if case.outcome != "handled":
            print(
                f"  {case.outcome}: {case.kind} / {case.target} / {case.detail}: {case.note[:300]}"
            )
    print(
        f"{summary['tried']} tried, {summary['handled']} handled / {summary['weak']} weak / "
        f"{summary['silent-wrong']} silent-wrong / {summary['unsafe']} unsafe ({secs:.0f} s)"
    )


if __name__ == "__main__":
    main()
