"""Load, validate and resolve the pipeline configuration; derive stage specs, hashes and paths.

The configuration is experiment content only (what to compute):

* ``configs/default.yaml`` — the run: benchmarks, attributors, results directory, launcher kind;
* ``configs/benchmarks/<name>.yaml`` — one benchmark: setting, overrides, recipe, ground truth;
* ``configs/attributors/<name>.yaml`` — one method: class name and hyper-parameters.

Each file is validated against its JSON schema in ``workflow/schemas/`` before anything runs; an
unknown key, a wrong type or an unknown method raises :class:`~tdabench.errors.ConfigError` naming
the key and the file. Defaults from the schemas are filled in.

Every stage output lives under a directory named by a short hash of exactly the parameters that
determine it (:func:`stage_spec` + :func:`spec_hash`). A parameter change therefore produces a new
path that Snakemake builds, with or without its own metadata (which a fresh clone after
``dvc pull`` does not have), and results computed with different parameters never mix.
This module imports only the standard library, PyYAML and jsonschema: the Snakefile imports it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdabench.errors import ConfigError

__all__ = [
    "SETTING_METRICS",
    "STAGES",
    "deep_merge",
    "groundtruth_kinds",
    "load_config",
    "load_yaml",
    "paths",
    "resolve_config",
    "schema_dir",
    "spec_hash",
    "stage_spec",
    "validate",
]

STAGES = (
    "prepare",
    "train",
    "groundtruth",
    "merge",
    "attribute",
    "evaluate",
    "brittleness",
    "report",
)

#: Metrics evaluated when a benchmark file says ``metrics: null`` (mirrors BenchmarkSetting.metrics
#: of tdabench.benchmark without importing torch at workflow-parse time).
SETTING_METRICS: dict[str, tuple[str, ...]] = {
    "mnist_lr": ("lds", "loo", "auc"),
    "mnist_mlp": ("lds", "loo", "auc"),
    "fmnist_lr": ("lds", "loo", "auc"),
    "fmnist_mlp": ("lds", "loo", "auc"),
    "cifar2_resnet9": ("lds", "auc"),
    "cifar10_resnet9": ("lds", "auc"),
    "cifar2_resnet9_tiny": ("lds", "auc"),
    "cifar10_resnet9_tiny": ("lds", "auc"),
    "maestro_musictransformer": ("lds",),
    "maestro_musictransformer_tiny": ("lds",),
    "shakespeare_nanogpt": ("lds",),
    "shakespeare_nanogpt_tiny": ("lds",),
}

_HASH_LEN = 12
_FORMAT_VERSION = 1  # bump when the on-disk layout of stage outputs changes


def schema_dir() -> Path:
    """Directory of the JSON schemas (``$TDABENCH_SCHEMAS`` or the repository's workflow/schemas)."""
    env = os.environ.get("TDABENCH_SCHEMAS")
    candidates = [Path(env)] if env else []
    candidates += [
        Path(__file__).resolve().parents[3] / "workflow" / "schemas",
        Path.cwd() / "workflow" / "schemas",
    ]
    for c in candidates:
        if (c / "config.schema.yaml").is_file():
            return c
    raise ConfigError(
        f"no workflow/schemas/config.schema.yaml found (looked in {[str(c) for c in candidates]}); "
        "run from the repository root or set TDABENCH_SCHEMAS to the schemas directory."
    )


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML file, with errors that name the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {p} does not exist; create it or fix the name that points to it."
        )
    try:
        with p.open() as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc}); fix the syntax.") from exc
    return {} if data is None else data


_SCHEMAS: dict[str, dict[str, Any]] = {}


def _schema(name: str) -> dict[str, Any]:
    if name not in _SCHEMAS:
        _SCHEMAS[name] = load_yaml(schema_dir() / f"{name}.schema.yaml")
    return _SCHEMAS[name]


def _resolve_ref(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    if not ref:
        return schema
    node: Any = root
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    merged = dict(node)
    merged.update({k: v for k, v in schema.items() if k != "$ref"})
    return merged


def _fill_defaults(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    schema = _resolve_ref(schema, root)
    if not isinstance(instance, dict):
        return instance
    for key, sub in schema.get("properties", {}).items():
        sub = _resolve_ref(sub, root)
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            instance[key] = _fill_defaults(instance[key], sub, root)
    return instance


def _dotted(path: Any) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "<top level>"


def validate(instance: Any, schema_name: str, source: str) -> dict[str, Any]:
    """Validate ``instance`` against ``workflow/schemas/<schema_name>.schema.yaml``; fill defaults.

    Args:
        instance: the parsed YAML.
        schema_name: ``config``, ``benchmark`` or ``attributor``.
        source: what to name in errors (the file, plus "with overrides" where relevant).

    Returns:
        A deep copy of ``instance`` with the schema's defaults filled in.

    Raises:
        ConfigError: naming the file, the key and the fix, for the first problem found
            (all problems are listed when there are several).
    """
    import jsonschema

    schema = _schema(schema_name)
    if not isinstance(instance, dict):
        raise ConfigError(
            f"{source}: expected a mapping of keys at the top level, got {type(instance).__name__}."
        )
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(
        validator_cls(schema).iter_errors(instance), key=lambda e: list(e.absolute_path)
    )
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(_explain(e) for e in errors))
    return _fill_defaults(copy.deepcopy(instance), schema, schema)


def _explain(error: Any) -> str:
    where = _dotted(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(repr(f"{where}.{k}" if error.absolute_path else k) for k in unknown)
        return f"unknown key {keys} (allowed here: {', '.join(allowed)}); remove or rename it"
    if error.validator == "enum":
        what = "method" if where == "method" else ("setting" if where == "setting" else "value")
        return (
            f"key '{where}': unknown {what} {error.instance!r}; "
            f"use one of {', '.join(map(str, error.validator_value))}"
        )
    if error.validator == "type":
        return (
            f"key '{where}': {error.instance!r} is not of type "
            f"{error.validator_value!r}; fix its value"
        )
    if error.validator == "required":
        return f"{error.message} (key missing at {where}); add it"
    return f"key '{where}': {error.message}"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``override`` wins; nested mappings are merged, not replaced."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_model_counts(
    benches: Mapping[str, Any], attrs: Mapping[str, Any], configs_dir: Path
) -> None:
    """Every benchmark trains at least the models and checkpoints its attributors use."""
    for bname, b in benches.items():
        for kind, key, what in (
            ("final", "ensemble", "final models"),
            ("epochs", "checkpoints", "checkpoints"),
        ):
            need = max(
                (
                    a["checkpoints"]["count"]
                    for n, a in attrs.items()
                    if n in b["attributors"] and a["checkpoints"]["kind"] == kind
                ),
                default=1,
            )
            if need > b["train"][key]:
                raise ConfigError(
                    f"{configs_dir / 'benchmarks' / (bname + '.yaml')}: key 'train.{key}' is "
                    f"{b['train'][key]} but an attributor needs {need} {what}; raise it."
                )


def _named_file(configs_dir: Path, what: str, name: str, source: str) -> Path:
    """``configs/<what>s/<name>.yaml``, or ConfigError naming the known ones and the fix."""
    path = configs_dir / f"{what}s" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (configs_dir / f"{what}s").glob("*.yaml"))
        raise ConfigError(
            f"{source}: key '{what}s': no file {path} for {what} {name!r}; "
            f"known {what}s: {', '.join(known) or 'none'}. Add the file or fix the name."
        )
    return path


def resolve_config(
    raw: Mapping[str, Any],
    source: str = "configs/default.yaml",
    base_dir: str | os.PathLike[str] = ".",
) -> dict[str, Any]:
    """Validate the run config and load every benchmark / attributor file it names.

    Args:
        raw: the run configuration (e.g. Snakemake's ``config``: default.yaml + overrides).
        source: name used in error messages.
        base_dir: directory that relative ``configs_dir`` is resolved against.

    Returns:
        ``{**run_config, "benchmark_configs": {name: cfg}, "attributor_configs": {name: cfg}}``
        with defaults filled, each benchmark's ``metrics``/``attributors`` resolved, and every
        attributor a benchmark uses loaded and validated.
    """
    cfg = validate(dict(raw), "config", source)
    configs_dir = Path(base_dir) / cfg["configs_dir"]
    benches: dict[str, Any] = {}
    for name in cfg["benchmarks"]:
        path = _named_file(configs_dir, "benchmark", name, source)
        b = validate(load_yaml(path), "benchmark", str(path))
        if b["metrics"] is None:
            b["metrics"] = list(SETTING_METRICS.get(b["setting"], ("lds",)))
        if b["attributors"] is None:
            b["attributors"] = list(cfg["attributors"])
        benches[name] = b
    attrs: dict[str, Any] = {}
    for name in sorted(
        {a for b in benches.values() for a in b["attributors"]} | set(cfg["attributors"])
    ):
        path = _named_file(configs_dir, "attributor", name, source)
        attrs[name] = validate(load_yaml(path), "attributor", str(path))
    _check_model_counts(benches, attrs, configs_dir)
    from tdabench.pipeline.launcher import LauncherSettings

    LauncherSettings.from_dict(cfg["launcher"])  # the class the stage uses checks it too
    out = dict(cfg)
    out["benchmark_configs"] = benches
    out["attributor_configs"] = attrs
    return out


def load_config(
    path: str | os.PathLike[str] = "configs/default.yaml",
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read the run configuration file, apply ``overrides`` (deep merge) and resolve it.

    Relative ``configs_dir`` is resolved against the current directory (the repository root),
    like Snakemake does.
    """
    raw = load_yaml(path)
    source = str(path)
    if overrides:
        raw = deep_merge(raw, overrides)
        source += " (with overrides)"
    return resolve_config(raw, source)


def groundtruth_kinds(cfg: Mapping[str, Any], benchmark: str) -> list[str]:
    """Ground-truth kinds a benchmark needs: ``lds`` for LDS, ``loo`` for LOO correlation."""
    metrics = cfg["benchmark_configs"][benchmark]["metrics"]
    return [k for k in ("lds", "loo") if k in metrics]


def _bench_core(b: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "setting": b["setting"],
        "overrides": b["overrides"],
        "data": b["data"],
        "data_root": cfg["data_root"],
    }


def _brittleness_spec(
    cfg: Mapping[str, Any], b: Mapping[str, Any], benchmark: str | None, method: str | None
) -> dict[str, Any]:
    return {
        "stage": "brittleness",
        "method": method,
        "attribute": stage_spec(cfg, "attribute", benchmark, method=method),
        "brittleness": b["brittleness"],
    }


def _report_spec(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "stage": "report",
        "benchmarks": list(cfg["benchmarks"]),
        "attributors": {b: cfg["benchmark_configs"][b]["attributors"] for b in cfg["benchmarks"]},
        "report": cfg["report"],
    }


def _groundtruth_spec(
    cfg: Mapping[str, Any], b: Mapping[str, Any], kind: str | None
) -> dict[str, Any]:
    if kind not in ("lds", "loo"):
        raise ConfigError(f"ground-truth kind must be 'lds' or 'loo', got {kind!r}")
    g = dict(b["groundtruth"][kind])
    g.pop("num_subsets" if kind == "lds" else "num_indices")
    # the clean training data is what ground truth retrains on; the noisy variant is not used
    return {
        "stage": "groundtruth",
        "format": _FORMAT_VERSION,
        "kind": kind,
        **_bench_core(b, cfg),
        "recipe": b["recipe"],
        "seed": b["groundtruth"]["seed"],
        "spec": g,
    }


def stage_spec(
    cfg: Mapping[str, Any],
    stage: str,
    benchmark: str | None = None,
    *,
    method: str | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """Exactly the parameters that determine ``stage``'s output (JSON-able; hashed into paths).

    Nested specs of upstream stages are included, so a change upstream changes every hash below.
    Counts that only *extend* work (``num_subsets``, ``num_indices``) are excluded from the
    ground-truth spec (``count`` is returned separately by :func:`paths`): raising them adds
    shards to the same store instead of starting a new one.
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; use one of {STAGES}")
    if stage == "report":
        return _report_spec(cfg)
    if benchmark not in cfg["benchmark_configs"]:
        raise ConfigError(
            f"benchmark {benchmark!r} is not in this run's list {list(cfg['benchmarks'])}"
        )
    b = cfg["benchmark_configs"][benchmark]
    prepare = {
        "stage": "prepare",
        "format": _FORMAT_VERSION,
        **_bench_core(b, cfg),
        "auc": b["auc"],
    }
    if stage == "prepare":
        return prepare
    if stage == "train":
        return {"stage": "train", "prepare": prepare, "recipe": b["recipe"], "train": b["train"]}
    if stage in ("groundtruth", "merge"):
        return _groundtruth_spec(cfg, b, kind)
    if stage == "attribute":
        if method not in cfg["attributor_configs"]:
            raise ConfigError(
                f"attributor {method!r} is not configured; add configs/attributors/{method}.yaml"
            )
        return {
            "stage": "attribute",
            "train": stage_spec(cfg, "train", benchmark),
            "method": method,
            "attributor": cfg["attributor_configs"][method],
            "num_test": b["data"]["num_test"],
        }
    if stage == "brittleness":
        return _brittleness_spec(cfg, b, benchmark, method)
    # evaluate
    return {
        "stage": "evaluate",
        "method": method,
        "num_test": b["data"]["num_test"],
        "metrics": b["metrics"],
        "targets": {k: b["groundtruth"][k]["target"] for k in ("lds", "loo")},
        "evaluate": cfg["evaluate"],
    }


def spec_hash(spec: Mapping[str, Any]) -> str:
    """Short, stable content hash of a stage spec (canonical JSON, sha256, 12 hex digits)."""
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:_HASH_LEN]


def paths(cfg: Mapping[str, Any], benchmark: str) -> dict[str, Any]:
    """Every output path of ``benchmark`` (strings, relative to the working directory).

    Layout (``<h>`` = :func:`spec_hash` of the stage's spec)::

        results/<b>/data/<h>/meta.json, noisy.parquet           prepare
        results/<b>/models/<h>/                                  train (safetensors + manifest.json)
        results/<b>/groundtruth/<kind>/<h>/shards/               ground-truth store (one file per shard)
        results/<b>/groundtruth/<kind>/<h>/complete-<n>.json     all n removals/subsets done
        results/<b>/groundtruth/<kind>/<h>/merged-<n>.parquet    merge
        results/<b>/scores/<method>/<h>/scores.parquet, self.parquet   attribute
        results/metrics/<b>/<method>.json                        evaluate (stable name for dvc metrics)
        results/<b>/plots/<method>.json                          evaluate (ROC / LOO scatter data)
        results/<b>/brittleness/<method>/<h>/shards/             brittleness store (if in metrics)
        results/brittleness/<b>/<method>.json                    brittleness
    """
    R = cfg["results_dir"]
    b = cfg["benchmark_configs"][benchmark]
    root = f"{R}/{benchmark}"
    data = f"{root}/data/{spec_hash(stage_spec(cfg, 'prepare', benchmark))}"
    out: dict[str, Any] = {
        "root": root,
        "data": data,
        "meta": f"{data}/meta.json",
        "noisy": f"{data}/noisy.parquet",
        "models": f"{root}/models/{spec_hash(stage_spec(cfg, 'train', benchmark))}",
        "groundtruth": {},
        "scores": {},
        "self_scores": {},
        "metrics": {},
    }
    for kind in groundtruth_kinds(cfg, benchmark):
        d = f"{root}/groundtruth/{kind}/{spec_hash(stage_spec(cfg, 'groundtruth', benchmark, kind=kind))}"
        n = b["groundtruth"][kind]["num_subsets" if kind == "lds" else "num_indices"]
        out["groundtruth"][kind] = {
            "dir": d,
            "count": n,
            "complete": f"{d}/complete-{n}.json",
            "merged": f"{d}/merged-{n}.parquet",
        }
    for m in b["attributors"]:
        h = spec_hash(stage_spec(cfg, "attribute", benchmark, method=m))
        out["scores"][m] = f"{root}/scores/{m}/{h}/scores.parquet"
        out["self_scores"][m] = f"{root}/scores/{m}/{h}/self.parquet"
        out["metrics"][m] = f"{R}/metrics/{benchmark}/{m}.json"
        if "brittleness" in b["metrics"]:
            hb = spec_hash(stage_spec(cfg, "brittleness", benchmark, method=m))
            out.setdefault("brittleness", {})[m] = {
                "store": f"{root}/brittleness/{m}/{hb}",
                "out": f"{R}/brittleness/{benchmark}/{m}.json",
            }
    return out
