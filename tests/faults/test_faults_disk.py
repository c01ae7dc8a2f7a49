"""Disk full: "disk full at PATH" at the top level, never retried, nothing partial kept."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest
from fault_helpers import METHOD, REPO, B

from tdabench.errors import DiskFullError
from tdabench.pipeline.cli import main
from tdabench.pipeline.stages.groundtruth import FULL, GroundTruthShard


def _full_disk(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


def test_attribute_disk_full_is_reported_at_top_level(tiny, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    p = tiny.p
    out = tiny.results / "new" / "scores.parquet"
    argv = [
        "attribute",
        "--benchmark",
        B,
        "--spec",
        json.dumps(tiny.spec("attribute", method=METHOD)),
        "--data",
        p["data"],
        "--models",
        p["models"],
        "--out",
        str(out),
        "--out-self",
        str(out.with_name("self.parquet")),
    ]
    _full_disk(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="tdabench.pipeline.cli"):
        assert main(argv) == 2
    assert "DiskFullError: disk full at" in caplog.text and "scores.parquet" in caplog.text
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_groundtruth_disk_full_is_not_retried(tiny, monkeypatch):
    import shutil

    g = tiny.p["groundtruth"]["loo"]
    shutil.rmtree(g["dir"])
    calls = []
    real = GroundTruthShard.__call__

    def counting(self, shard_id):
        calls.append(shard_id)
        return real(self, shard_id)

    monkeypatch.setattr(GroundTruthShard, "__call__", counting)
    GroundTruthShard(tiny.spec("groundtruth", kind="loo"), g["count"], g["dir"]).objects()
    _full_disk(monkeypatch)  # the store exists; its first shard cannot be written
    launcher = {"kind": "debug", "folder": str(tiny.results / "sub"), "max_retries": 2}
    from tdabench.pipeline import stages

    with pytest.raises(DiskFullError, match="disk full at"):
        stages.groundtruth(
            tiny.spec("groundtruth", kind="loo"),
            g["count"],
            g["dir"],
            g["complete"],
            launcher=launcher,
            benchmark=B,
        )
    # the first task (LOO's full model, id FULL = -1) failed once; no retry, no other task started
    assert calls == [FULL]
    assert not os.path.exists(g["complete"])


def test_raw_enospc_outside_io_is_reported_as_disk_full(tiny, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    import sys

    prepare_module = sys.modules["tdabench.pipeline.stages.prepare"]  # (the package exports
    # a function of the same name)

    def write_table(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", "/results/x/noisy.parquet")

    monkeypatch.setattr(prepare_module, "write_table", write_table)
    spec = json.dumps(tiny.spec("prepare"))
    with caplog.at_level(logging.ERROR, logger="tdabench.pipeline.cli"):
        rc = main(
            ["prepare", "--benchmark", B, "--spec", spec, "--out-dir", str(tiny.results / "d")]
        )
    assert rc == 2 and "disk full at '/results/x/noisy.parquet'" in caplog.text
