"""Kill/resume fault benchmark for the ground-truth engine.

Each trial runs a shard-producing subprocess on a fresh store, SIGKILLs it at random points
(1 to ``--max-kills`` times: at a random shard, a random moment inside it, sometimes even
during start-up), reruns it until it finishes, and checks:

* every rerun trains only shards that were missing when it started;
* the final store is bit-identical to an uninterrupted reference run (same data checksum
  for every shard, same merged checksum);
* the merged table has every (entry, run) exactly once (nothing lost, nothing duplicated);
* no temporary file is left behind.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/kill_resume.py --trials 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

NUM_SUBSETS, SHARD_SIZE, NUM_RUNS = 24, 3, 2
DELAY = 0.015  # seconds per trained model, so that kills land mid-shard


_DEVICE_ENV = "TDABENCH_KILL_RESUME_DEVICE"


def _setup(store_dir: str | os.PathLike) -> tuple[Any, Any, Any]:
    from tdabench.groundtruth import GroundTruthSpec, ToySoftmaxTrainer, make_toy_data, open_store

    train, test = make_toy_data(n_train=50, n_test=7, dim=4, num_classes=3, seed=11)
    device = os.environ.get(_DEVICE_ENV, "cpu")  # set by main(); inherited by the killed workers
    if device == "cpu":
        trainer: Any = ToySoftmaxTrainer(train, test, 3, epochs=3, delay=DELAY)
    else:  # the real batched trainer on that device (same toy data and shard layout)
        from torch import nn

        from tdabench.groundtruth.trainer import BatchedTrainer

        trainer = BatchedTrainer(
            lambda: nn.Linear(4, 3),
            train,
            test,
            dict(lr=0.5, epochs=3, batch_size=16),
            dtype=torch.float64,
            device=device,
        )
    spec = GroundTruthSpec(
        kind="lds",
        num_subsets=NUM_SUBSETS,
        shard_size=SHARD_SIZE,
        num_runs=NUM_RUNS,
        targets=("loss", "margin"),
        seed=5,
        keep_checkpoints=True,
    )
    return spec, trainer, open_store(store_dir, spec, trainer)


def worker(store_dir: str, log: str) -> None:
    """Compute every missing shard, logging ``train <id>`` before and ``done <id>`` after each."""
    from tdabench.groundtruth import missing_shards, run_shard

    spec, trainer, store = _setup(store_dir)
    store.clean_temporaries()
    with open(log, "a") as fh:
        for sid in missing_shards(store, spec):
            fh.write(f"train {sid}\n")
            fh.flush()
            os.fsync(fh.fileno())
            run_shard(store, spec, trainer, sid, force=True)
            fh.write(f"done {sid}\n")
            fh.flush()


def _digests(store: Any) -> dict[str, str]:
    import pyarrow.parquet as pq

    return {
        p.name: pq.read_schema(p).metadata[b"tdabench.sha256"].decode()
        for _, p in store.shard_files()
    }


def reference(store_dir: str | os.PathLike) -> tuple[dict[str, str], str]:
    """Uninterrupted run in this process: shard digests and merged digest."""
    import pyarrow.parquet as pq

    from tdabench.groundtruth import merge, run_shards

    spec, trainer, store = _setup(store_dir)
    run_shards(store, spec, trainer, progress=False)
    merged = merge(store, spec)
    return _digests(store), pq.read_schema(merged).metadata[b"tdabench.sha256"].decode()


def _start(store_dir: Path, log: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(store_dir), str(log)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _log_lines(log: Path, start: int) -> list[str]:
    if not log.exists():
        return []
    return log.read_text().splitlines()[start:]


def trial(
    rng: np.random.Generator, work: Path, ref: tuple[dict[str, str], str], max_kills: int
) -> dict[str, Any]:
    """One trial; returns a dict with ``ok`` and details."""
    import pyarrow.parquet as pq

    from tdabench.groundtruth import load_runs, merge, missing_shards

    store_dir, log = work / "store", work / "log.txt"
    spec, _, store = _setup(store_dir)
    n_shards = len(spec.shard_ids(50))
    kills, problems, trained_total = int(rng.integers(1, max_kills + 1)), [], 0
    killed_at = []
    for attempt in range(kills + 1):
        missing_before = set(missing_shards(store, spec))
        if not missing_before:
            break
        offset = len(_log_lines(log, 0))
        proc = _start(store_dir, log)
        final = attempt == kills
        if not final:
            if rng.random() < 0.1:  # sometimes during start-up
                time.sleep(rng.uniform(0.0, 1.0))
            else:
                target = int(rng.integers(1, len(missing_before) + 1))
                t0 = time.time()
                while (
                    proc.poll() is None
                    and sum(1 for x in _log_lines(log, offset) if x.startswith("train")) < target
                ):
                    if time.time() - t0 > 120:
                        break
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, SHARD_SIZE * NUM_RUNS * DELAY * 1.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed_at.append(sum(1 for x in _log_lines(log, offset) if x.startswith("train")))
        _, err = proc.communicate(timeout=300)
        if final and proc.returncode != 0:
            problems.append(f"final run failed rc={proc.returncode}: {err.decode()[-500:]}")
        trained = {int(x.split()[1]) for x in _log_lines(log, offset) if x.startswith("train")}
        trained_total += len(trained)
        if not trained <= missing_before:
            problems.append(
                f"run {attempt} retrained complete shards {sorted(trained - missing_before)}"
            )
    if missing_shards(store, spec):
        problems.append(f"shards still missing: {missing_shards(store, spec)}")
    ref_digests, ref_merged = ref
    if _digests(store) != ref_digests:
        problems.append("shard checksums differ from the uninterrupted run")
    merged = merge(store, spec)
    if pq.read_schema(merged).metadata[b"tdabench.sha256"].decode() != ref_merged:
        problems.append("merged checksum differs from the uninterrupted run")
    values, entries, _ = load_runs(merged, "loss")
    if entries.tolist() != list(range(NUM_SUBSETS)) or values.shape[1] != NUM_RUNS:
        problems.append("rows lost or duplicated")
    leftovers = [p.name for p in store_dir.rglob(".*.tmp")]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    for sid in spec.shard_ids(50):  # checkpoints are whole and belong to their shard
        try:
            store.load_checkpoint(sid)
        except Exception as exc:
            problems.append(f"checkpoint {sid}: {exc}")
    return {
        "ok": not problems,
        "problems": problems,
        "kills": len(killed_at),
        "killed_at_shard": killed_at,
        "shards_trained": trained_total,
        "n_shards": n_shards,
    }


def run_trials(
    trials: int, seed: int = 0, max_kills: int = 3, base: str | None = None
) -> dict[str, Any]:
    """Run ``trials`` trials; returns a summary with per-trial results."""
    rng = np.random.Generator(np.random.PCG64(seed))
    root = Path(tempfile.mkdtemp(prefix="killresume-", dir=base))
    try:
        ref = reference(root / "reference")
        results = []
        for i in range(trials):
            work = root / f"trial{i}"
            work.mkdir()
            results.append(trial(rng, work, ref, max_kills))
            shutil.rmtree(work)
        return {
            "trials": trials,
            "passed": sum(r["ok"] for r in results),
            "kills": sum(r["kills"] for r in results),
            "shards_trained": sum(r["shards_trained"] for r in results),
            "shards_needed": sum(r["n_shards"] for r in results),
            "results": results,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-kills", type=int, default=3)
    ap.add_argument(
        "--device",
        default="cpu",
        help="cpu (the toy trainer, default) or e.g. cuda (BatchedTrainer there)",
    )
    args = ap.parse_args()
    os.environ[_DEVICE_ENV] = (
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    t0 = time.time()
    s = run_trials(args.trials, args.seed, args.max_kills)
    for i, r in enumerate(s["results"]):
        status = "ok  " if r["ok"] else "FAIL"
        print(
            f"trial {i:2d} {status} kills={r['kills']} killed after 'train' #{r['killed_at_shard']} "
            f"shards trained={r['shards_trained']}/{r['n_shards']} {'; '.join(r['problems'])}"
        )
    print(
        f"\n{s['passed']}/{s['trials']} trials bit-identical to the uninterrupted run; "
        f"{s['kills']} SIGKILLs; {s['shards_trained']} shard trainings for {s['shards_needed']} shards "
        f"(extra = work redone after kills); {time.time() - t0:.1f} s"
    )
    sys.exit(0 if s["passed"] == s["trials"] else 1)


if __name__ == "__main__":
    main()
