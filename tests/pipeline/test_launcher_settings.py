"""One channel for launcher settings (issue 15.5): one validated object, built once from the
config and the profile, reaching the ground-truth stage as one ``--launcher`` JSON argument that
never reruns a job."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from pipeline_helpers import BIN, REPO, jobs_scheduled, make_workspace, snakemake, trace_lines

from tdabench.errors import ConfigError
from tdabench.pipeline.launcher import LauncherSettings, SlurmSettings
from tdabench.pipeline.profile import (
    SHARD_RESOURCES,
    launcher_settings,
    render_slurm_profile,
    shard_request,
    shard_resources,
)

FULL = {
    "kind": "slurm",
    "folder": "logs/x",
    "max_retries": 5,
    "array_parallelism": 7,
    "poll_s": 0.5,
    "slurm": {
        "partition": "gpu",
        "account": "lab",
        "qos": "high",
        "gpus_per_node": 2,
        "cpus_per_task": 3,
        "mem_mb": 1536,
        "timeout_min": 90,
        "constraint": "a100",
        "setup": ["module load cuda"],
        "additional": {"exclusive": True},
    },
}


def test_round_trip_every_field():
    s = LauncherSettings.from_dict(FULL)
    assert s.to_dict() == FULL  # nothing lost, nothing converted
    assert LauncherSettings.from_dict(s.to_dict()) == s
    assert LauncherSettings.from_json(s.to_json()) == s
    assert json.loads(s.to_json()) == FULL
    assert s.slurm.mem_mb == 1536 and isinstance(s.slurm.mem_mb, int)
    # config -> profile resources -> settings: the same object (units never change)
    assert launcher_settings(LauncherSettings(), shard_resources(s)).slurm.mem_mb == 1536
    merged = launcher_settings(FULL, {"shard_mem_mb": 300, "launcher": "local", "mem_mb": 1})
    assert merged.slurm.mem_mb == 300 and merged.kind == "local"
    assert merged.slurm.qos == "high"  # what the profile does not set comes from the config


def test_install_profile_options_become_the_same_settings():
    req = shard_request("lab", "gpu", gpus_per_node=0, mem_gb=0.25, timeout_min=5)
    assert req.slurm.mem_mb == 256 and req.slurm.timeout_min == 5 and req.kind == "slurm"
    block = yaml.safe_load(render_slurm_profile(req))["set-resources"]["groundtruth"]
    assert set(block) <= set(SHARD_RESOURCES)
    assert launcher_settings({}, block).slurm == req.slurm  # the profile reads back exactly


@pytest.mark.parametrize("name", ["local", "slurm"])
def test_shipped_profiles_read_back(name):
    prof = yaml.safe_load((REPO / f"workflow/profiles/{name}/config.yaml").read_text())
    block = prof["set-resources"]["groundtruth"]
    s = launcher_settings({"folder": "f"}, block)
    assert s.kind == name and s.folder == "f"
    if name == "slurm":  # the template's numbers, in the settings' own units
        assert (s.slurm.mem_mb, s.slurm.timeout_min, s.array_parallelism) == (16384, 240, 32)


@pytest.mark.parametrize(
    ("settings", "resources", "names"),
    [
        ({"slurm": {"mem_mb": -5}}, None, ["launcher.slurm.mem_mb", "-5", "pass"]),
        ({"slurm": {"mem_mb": 2.5}}, None, ["launcher.slurm.mem_mb", "integer"]),
        ({"slurm": {"mem_gb": 4}}, None, ["'mem_gb'", "mem_mb: 4096", "Fix the key"]),
        ({"max_retries": -1}, None, ["launcher.max_retries", ">= 0"]),
        ({"poll_s": 0}, None, ["launcher.poll_s", "> 0"]),
        ({"kinds": "slurm"}, None, ["'kinds'", "allowed"]),
        ({}, {"shard_mem_mb": -5}, ["launcher.slurm.mem_mb", "-5"]),
        ({}, {"shard_memory": 5}, ["'shard_memory'", "shard_mem_mb", "set-resources"]),
        ({}, {"launcher": "cloud"}, ["launcher.kind='cloud'", "pick one"]),
    ],
)
def test_bad_values_name_the_key_and_the_fix(settings, resources, names):
    with pytest.raises(ConfigError) as e:
        launcher_settings(settings, resources)
    for part in names:
        assert part in str(e.value), str(e.value)


def test_bad_json_argument():
    with pytest.raises(ConfigError, match="not a JSON object"):
        LauncherSettings.from_json("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        LauncherSettings.from_json("{kind: slurm")
    assert SlurmSettings(partition="").partition is None  # the profile's empty placeholder


def test_the_workflow_passes_exactly_one_channel():
    rules = "\n".join(
        p.read_text() for p in [REPO / "Snakefile", *sorted((REPO / "workflow").rglob("*.smk"))]
    )
    assert "TDABENCH_LAUNCHER" not in rules and "--launcher-set" not in rules
    assert len(re.findall(r"--launcher \{", rules)) == 1  # one argument, in one rule
    assert "resources.shard_" not in rules  # no per-setting flags
    assert "/1024" not in rules and "mem_gb" not in rules
    src = "\n".join(p.read_text() for p in (REPO / "src").rglob("*.py"))
    assert "TDABENCH_LAUNCHER" not in src and "launcher-set" not in src


def _profile(ws, **resources):
    prof = ws / "prof"
    prof.mkdir(exist_ok=True)
    text = yaml.safe_dump({"cores": 2, "set-resources": {"groundtruth": resources}})
    (prof / "config.yaml").write_text(text)
    return str(prof)


@pytest.mark.slow
def test_profile_settings_reach_the_stage_and_never_rerun(tmp_path, toy_env):
    """The profile's resources and the config's block arrive merged in the stage (its log says
    what it got); changing them afterwards schedules nothing (no output's key depends on them)."""
    ws = make_workspace(tmp_path / "ws")
    prof = _profile(ws, launcher="debug", shard_mem_mb=1234, launcher_parallelism=3)
    snakemake(ws, "--profile", prof)
    assert any(line.startswith("groundtruth") for line in trace_lines(toy_env))
    for log in ws.glob("logs/mnist_lr/groundtruth-*.log"):
        text = log.read_text()
        (line,) = [x for x in text.splitlines() if "launcher settings: " in x]
        got = json.loads(line.split("launcher settings: ", 1)[1])
        assert got["kind"] == "debug" and got["array_parallelism"] == 3
        assert got["slurm"]["mem_mb"] == 1234 and got["poll_s"] == 0.2  # config's poll_s
    before = sorted(p.relative_to(ws) for p in ws.glob("results/**/*") if p.is_file())
    prof = _profile(ws, launcher="local", shard_mem_mb=999, shard_partition="other")
    assert jobs_scheduled(ws) == {}
    assert snakemake(ws, "--profile", prof, "-n").returncode == 0
    cfg = yaml.safe_load((ws / "configs/default.yaml").read_text())
    cfg["launcher"].update(max_retries=7, array_parallelism=4)
    cfg["launcher"]["slurm"] = {"mem_mb": 77, "partition": "p"}
    (ws / "configs/default.yaml").write_text(yaml.safe_dump(cfg))
    assert jobs_scheduled(ws) == {}
    after = sorted(p.relative_to(ws) for p in ws.glob("results/**/*") if p.is_file())
    assert after == before


def _failing_snakemake(ws, *args):
    cmd = [str(BIN / "snakemake"), "--cores", "2", *args]
    res = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def test_bad_settings_fail_before_any_job(tmp_path, toy_env):
    """A bad profile resource or config value stops Snakemake while it reads the workflow."""
    ws = make_workspace(tmp_path / "ws")
    out = _failing_snakemake(ws, "--profile", _profile(ws, shard_memory=512))
    assert "unknown groundtruth resource 'shard_memory'" in out and "shard_mem_mb" in out, out
    cfg = yaml.safe_load((ws / "configs/default.yaml").read_text())
    cfg["launcher"]["slurm"] = {"mem_mb": -5}
    (ws / "configs/default.yaml").write_text(yaml.safe_dump(cfg))
    out = _failing_snakemake(ws)
    assert "launcher.slurm.mem_mb" in out and "ConfigError" in out, out
    assert trace_lines(toy_env) == [] and not (ws / "results").exists()
