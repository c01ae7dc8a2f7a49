"""Each rule's log holds its whole story (issue 16.5), and progress shows as a tqdm bar on a
terminal and as log lines otherwise.

Before: the ground-truth rule's log kept its first line only (importing submitit runs
``logging.config.dictConfig``, which closed the ``mode="w"`` file handler), failures left no
traceback in it, and no progress line was ever written."""

from __future__ import annotations

import io
import logging
import logging.config
import os
import subprocess
import sys

import pytest
import torch
from pipeline_helpers import REPO, make_workspace
from torch.utils.data import TensorDataset

from tdabench.groundtruth import GroundTruthSpec, ToySoftmaxTrainer, make_toy_data, open_store
from tdabench.groundtruth.engine import run_shards
from tdabench.groundtruth.progress import Progress
from tdabench.pipeline.cli import _setup_logging, main
from tdabench.pipeline.stages.attribute import LoggedLoader


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture
def restore_logging():
    yield
    _setup_logging(None, False)  # drop the test's file handlers
    for name in ("", "tdabench", "submitit", "py.warnings"):
        for h in list(logging.getLogger(name).handlers):
            if getattr(h, "_tdabench_cli", False):
                logging.getLogger(name).removeHandler(h)
                h.close()


_CASES = {
    # launcher, kind: (--set options, the stage's line, tasks (shards + LOO's full model))
    ("local", "lds"): (["launcher.array_parallelism=2"], "6 subsets, 2 shards of 3", 2),
    ("slurm", "loo"): (
        ["launcher.slurm.mem_mb=256", "launcher.poll_s=1", "launcher.array_parallelism=3"],
        "4 removals, 2 shards of 2",
        3,
    ),
}


@pytest.mark.parametrize(
    "launcher,kind",
    [("local", "lds"), pytest.param("slurm", "loo", marks=pytest.mark.slurm)],
)
def test_groundtruth_rule_log_holds_the_whole_story(launcher, kind, tmp_path):
    """The real ground-truth stage through submitit (local processes, or a SLURM job array on
    the CI cluster), as the rule runs it: the rule log tells the story and names each worker's
    stdout/stderr, which hold the worker's own story."""
    sets, what, tasks = _CASES[(launcher, kind)]
    ws = make_workspace(tmp_path / "ws")  # mnist_lr, 600 digits, LDS 6 in 2 shards, LOO 4 in 2
    log = ws / "logs/gt.log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("TDABENCH_STAGES", None)
    cmd = [sys.executable, "-m", "tdabench.pipeline", "groundtruth", "--benchmark", "mnist_lr"]
    cmd += ["--kind", kind, "--log", str(log), "--set", f"launcher.kind={launcher}"]
    for item in ["launcher.poll_s=0.2", *sets]:
        cmd += ["--set", item]
    res = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    text = log.read_text()
    name = f"gt-{kind}"
    for line in (
        "tdabench groundtruth started",  # start, with the parameters
        f"{name} of mnist_lr: {what}",  # what it computes, and the key
        f"{name}: submitted shard(s)",  # the launcher's records (after submitit's import)
        f"{name} shards: {tasks}/{tasks} (100%)",  # progress
        f"{name} done: 2 shards complete ({tasks} trained, 0 already complete)",  # counts
        "tdabench groundtruth done in",
    ):
        assert line in text, (line, text)
    assert f"{name} shards: 1/{tasks} (" in text, text
    workers = [ln.rsplit(" ", 1)[1] for ln in text.splitlines() if "worker log" in ln]
    errs = [ws / p for p in workers if p.endswith(".err")]
    assert len(errs) == tasks, text
    stories = "".join(p.read_text() for p in errs)  # each worker's own story, named in the log
    assert f"shard 0 ({kind}-0000000-" in stories and "done: " in stories, stories
    assert ("full model done" in stories) == (kind == "loo"), stories


def test_log_file_survives_submitit_logging_config(tmp_path, restore_logging):
    log = tmp_path / "rule.log"
    _setup_logging(str(log), False)
    logging.getLogger("tdabench.x").info("before")
    from submitit.core import logger as submitit_logger

    logging.config.dictConfig(submitit_logger.CONFIG)  # what importing submitit does
    logging.getLogger("tdabench.x").info("after")
    logging.getLogger("tdabench.x").warning("a warning")
    text = log.read_text()
    assert "before" in text and "after" in text and "WARNING tdabench.x: a warning" in text


def test_failure_traceback_goes_to_the_log_not_the_console(tmp_path, restore_logging, capsys):
    log = tmp_path / "rule.log"
    assert main(["merge", "--spec", "{}", "--complete", "x", "--out", "y", "--log", str(log)]) == 2
    text, err = log.read_text(), capsys.readouterr().err
    assert "tdabench merge started" in text
    assert "ConfigError: --spec is not a complete merge spec" in text
    assert "Traceback (most recent call last)" in text  # the whole story in the file ...
    assert "ConfigError: --spec is not a complete merge spec" in err
    assert "Traceback" not in err  # ... one line on the console


@pytest.mark.parametrize("stream", [_Tty, _Pipe])
def test_progress_bar_on_a_terminal_lines_otherwise(stream, monkeypatch, caplog):
    fake = stream()
    monkeypatch.setattr(sys, "stderr", fake)
    log = logging.getLogger("tdabench.test_progress")
    level = caplog.at_level(logging.INFO, logger="tdabench.test_progress")
    with level, Progress(20, "units", log, every_s=1e9, every_frac=0.25) as p:
        for _ in p.wrap(range(20)):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "tdabench.test_progress"]
    if stream is _Tty:
        assert "20/20" in fake.getvalue() and "units" in fake.getvalue()  # tqdm's bar
        assert lines == []
    else:
        assert fake.getvalue() == ""
        assert [ln.split(" in ")[0] for ln in lines] == [
            "units: 5/20 (25%)",
            "units: 10/20 (50%)",
            "units: 15/20 (75%)",
            "units: 20/20 (100%)",
        ]


@pytest.mark.parametrize("stream", [_Tty, _Pipe])
def test_retraining_shards_progress(stream, tmp_path, monkeypatch, caplog):
    """The engine's shards: a bar on a terminal, one line per 10% otherwise."""
    fake = stream()
    monkeypatch.setattr(sys, "stderr", fake)
    train, test = make_toy_data(n_train=24, n_test=5, seed=0)
    trainer = ToySoftmaxTrainer(train, test, num_classes=3, epochs=2)
    spec = GroundTruthSpec(kind="lds", num_subsets=4, subset_ratio=0.5, shard_size=2, seed=0)
    store = open_store(tmp_path / "store", spec, trainer)
    with caplog.at_level(logging.INFO, logger="tdabench.groundtruth.engine"):
        run_shards(store, spec, trainer)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shards: ")]
    if stream is _Tty:
        assert "2/2" in fake.getvalue() and lines == []
    else:
        assert fake.getvalue() == "" and [ln.split(" in ")[0] for ln in lines] == [
            "shards: 1/2 (50%)",
            "shards: 2/2 (100%)",
        ]


@pytest.mark.parametrize("tty", [True, False])
def test_attribution_batches_logged_off_a_terminal(tty, monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", _Tty() if tty else _Pipe())
    loader = LoggedLoader(TensorDataset(torch.arange(10.0)), batch_size=3, desc="m train loader")
    with caplog.at_level(logging.INFO, logger="tdabench.pipeline.stages.attribute"):
        first = [b[0] for b in loader]
        second = [b[0] for b in loader]
    assert torch.equal(torch.cat(first), torch.arange(10.0)) and len(second) == 4  # unchanged
    lines = [r.getMessage().split(", 4 batches")[0].split(", 8 batches")[0] for r in caplog.records]
    if tty:
        assert lines == []  # the attributors' own tqdm bars show on a terminal
    else:
        assert lines == ["m train loader: pass 1, batch 4/4", "m train loader: pass 2, batch 4/4"]
