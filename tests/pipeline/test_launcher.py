"""The submitit launcher on kind=debug (in-process) and kind=local (subprocesses) with toy shards."""

from __future__ import annotations

import pytest
from toy_stages import ToyShard, read_toy_shards

from tdabench.errors import ConfigError
from tdabench.pipeline.launcher import LaunchError, LauncherSettings, launch_shards


def _settings(tmp_path, kind="debug", **kw):
    return {"kind": kind, "folder": str(tmp_path / "logs"), "poll_s": 0.2, **kw}


def test_skips_complete_and_retries_failed(tmp_path):
    fail = tmp_path / "fail"
    fail.mkdir()
    (fail / "fail-2").touch()
    shard = ToyShard(str(tmp_path / "out"), seed=3, fail_dir=str(fail))
    shard(0)  # already complete before the launch
    before = (tmp_path / "out" / "shard-00000.parquet").stat().st_mtime_ns
    rep = launch_shards(shard, range(4), shard.is_complete, settings=_settings(tmp_path))
    assert rep.skipped == [0] and rep.completed == [1, 2, 3]
    assert rep.attempts == {1: 1, 2: 2, 3: 1}
    assert (tmp_path / "out" / "shard-00000.parquet").stat().st_mtime_ns == before
    # same values as an undisturbed run
    clean = ToyShard(str(tmp_path / "clean"), seed=3)
    for i in range(4):
        clean(i)
    assert read_toy_shards(tmp_path / "out") == read_toy_shards(tmp_path / "clean")
    # a second launch has nothing to do
    again = launch_shards(shard, range(4), shard.is_complete, settings=_settings(tmp_path))
    assert again.skipped == [0, 1, 2, 3] and again.completed == [] and again.job_ids == []


def test_gives_up_after_max_retries_naming_logs(tmp_path):
    fail = tmp_path / "fail"
    fail.mkdir()

    class AlwaysFails(ToyShard):
        def __call__(self, shard_id):
            if shard_id == 1:
                raise RuntimeError("boom")
            return super().__call__(shard_id)

    shard = AlwaysFails(str(tmp_path / "out"))
    with pytest.raises(LaunchError) as e:
        launch_shards(shard, [0, 1], shard.is_complete, settings=_settings(tmp_path, max_retries=1))
    msg = str(e.value)
    assert "shard 1" in msg and "after 2 submission(s)" in msg and "debug-shard1.log" in msg
    assert "RuntimeError: boom" in (tmp_path / "logs" / "debug-shard1.log").read_text()
    assert shard.is_complete(0)


def test_local_processes_retry(tmp_path):
    fail = tmp_path / "fail"
    fail.mkdir()
    (fail / "fail-1").touch()
    shard = ToyShard(str(tmp_path / "out"), seed=1, fail_dir=str(fail))
    rep = launch_shards(
        shard,
        [0, 1],
        shard.is_complete,
        settings=_settings(tmp_path, kind="local", array_parallelism=2),
    )
    assert rep.completed == [0, 1] and rep.attempts == {0: 1, 1: 2}
    assert len(read_toy_shards(tmp_path / "out")) == 8
    # logs of the subprocesses are under the folder, one directory per job
    assert any((tmp_path / "logs").glob("*/*_log.err"))


def test_settings_validation():
    with pytest.raises(ConfigError, match=r"launcher\.kind='cloud'"):
        LauncherSettings(kind="cloud")
    with pytest.raises(ConfigError, match=r"unknown launcher.slurm setting\(s\) \['partion'\]"):
        LauncherSettings.from_dict({"slurm": {"partion": "gpu"}})
    s = LauncherSettings.from_dict(
        {"kind": "slurm", "slurm": {"partition": "gpu", "setup": ["module load x"]}}
    )
    assert s.slurm.partition == "gpu" and s.slurm.setup == ("module load x",)


def test_partial_last_shard_is_redone_when_count_grows(tmp_path):
    small = ToyShard(str(tmp_path / "out"), rows_per_shard=4, count=6)
    launch_shards(small, range(2), small.is_complete, settings=_settings(tmp_path))
    big = ToyShard(str(tmp_path / "out"), rows_per_shard=4, count=8)
    rep = launch_shards(big, range(2), big.is_complete, settings=_settings(tmp_path))
    assert rep.skipped == [0] and rep.completed == [1]
    assert sorted(read_toy_shards(tmp_path / "out", count=8)) == list(range(8))
