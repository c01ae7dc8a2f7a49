# Shared definitions: the resolved configuration, output paths, and the stage command.
import json
import os
import sys

from tdabench.pipeline.config import paths, resolve_config, spec_hash, stage_spec
from tdabench.pipeline.profile import launcher_settings, shard_resources


def profile_overrides(workflow, rule):
    """The profile's (or --set-resources') concrete values for ``rule``: numbers are checked now,
    before any job starts; string values are Snakemake expressions, checked when the job runs."""
    given = workflow.resource_settings.overwrite_resources.get(rule, {})
    return {k: r.value for k, r in given.items() if not r.is_evaluable()}


# Validate configs/default.yaml (+ --config / --configfile overrides) and every benchmark and
# attributor file it names, against workflow/schemas/, before any job is scheduled.
CFG = resolve_config(config, source="configs/default.yaml (with --config/--configfile overrides)")
BENCHMARKS = CFG["benchmarks"]
R = CFG["results_dir"]
LOGS = CFG["logs_dir"]
P = {b: paths(CFG, b) for b in BENCHMARKS}
for _b, _p in P.items():  # evaluate's ROC / LOO-scatter data, read by the report
    _p["curves"] = {m: f"{_p['root']}/plots/{m}.json" for m in _p["metrics"]}

# Jobs run this checkout's code with this interpreter (installed or not).
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(Path(workflow.basedir) / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
)
# Where shards run is not a property of any result, so launcher settings never enter params or a
# spec (changing partition or account never reruns a job). One settings object, validated here
# before any job starts: the config's `launcher` block, overridden per run by the profile's
# `set-resources: groundtruth:` (profile.SHARD_RESOURCES); the groundtruth rule passes it to the
# stage as one argument, `--launcher JSON`.
LAUNCHER = launcher_settings(CFG["launcher"], profile_overrides(workflow, "groundtruth"))
# How much memory a job may plan with is not a property of any result either: it reaches the
# jobs through the environment.
if CFG.get("memory_budget") is not None:
    from tdabench.memory import parse_bytes

    parse_bytes(CFG["memory_budget"], total=1)  # a malformed budget fails before any job starts
    os.environ["TDABENCH_MEMORY_BUDGET"] = str(CFG["memory_budget"])
TDABENCH = f"{sys.executable} -m tdabench.pipeline"

REPORT = [f"{R}/report.md", f"{R}/report.html", f"{R}/summary.csv"]
# brittleness results of the benchmarks whose metrics list it (retrains models; empty by default)
BRITTLENESS = [e["out"] for b in BENCHMARKS for e in P[b].get("brittleness", {}).values()]


wildcard_constraints:
    b="|".join(BENCHMARKS),
    h="[0-9a-f]{12}",
    kind="lds|loo",
    method="[A-Za-z0-9_.-]+",
    n="[0-9]+",


def spec(stage, **sel):
    """Params function: the stage's spec as JSON, checked against the hash in the output path.

    Every output directory is named by the hash of the spec that made it, so a changed parameter
    gives a new path (built with or without Snakemake's metadata, e.g. right after `dvc pull`).
    """

    def get(wildcards):
        kw = {k: getattr(wildcards, v) for k, v in sel.items()}
        s = stage_spec(CFG, stage, wildcards.b, **kw)
        if "h" in wildcards.keys() and spec_hash(s) != wildcards.h:
            raise ValueError(
                f"{stage} output for hash {wildcards.h} was requested but the configuration gives "
                f"{spec_hash(s)}; request the current paths (snakemake without explicit file targets)"
            )
        return json.dumps(s, sort_keys=True)

    return get


def outputs(b, *parts):
    """Every file of benchmark ``b`` in ``parts`` (data, models, groundtruth, scores, metrics).

    Snakemake does not rebuild a missing intermediate file while the files made from it are up to
    date (that is how temp() works). Listing every output in the targets makes a deleted one a
    reason to rebuild it, and everything downstream of it.
    """
    p, out = P[b], []
    if "data" in parts:
        out += [p["meta"], p["noisy"]]
    if "models" in parts:
        out += [p["models"]]
    if "groundtruth" in parts:
        out += [f for g in p["groundtruth"].values() for f in (g["complete"], g["merged"])]
    if "scores" in parts:
        out += [f for m in p["scores"] for f in (p["scores"][m], p["self_scores"][m])]
    if "metrics" in parts:
        out += [f for m in p["metrics"] for f in (p["metrics"][m], p["curves"][m])]
    return out


# Per-benchmark aggregate targets (used by dvc.yaml): `snakemake groundtruth_<b>` / `scores_<b>`.
for _b in BENCHMARKS:

    rule:
        name:
            f"groundtruth_{_b}"
        localrule: True
        input:
            outputs(_b, "data", "groundtruth"),

    rule:
        name:
            f"scores_{_b}"
        localrule: True
        input:
            outputs(_b, "models", "scores", "metrics"),
