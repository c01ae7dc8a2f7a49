"""The ``tdabench`` stage CLI: the only command the Snakemake rules run.

Every stage takes its spec and paths explicitly (``--spec JSON`` + path options, which is how
the rules call it) or derives them from the configuration (``--config`` + ``--benchmark`` /
``--method`` / ``--kind``, for running one stage by hand); both give the same result::

    tdabench check-config [--config configs/default.yaml] [--set launcher.kind=debug]
    tdabench prepare     --benchmark mnist_lr
    tdabench train       --benchmark mnist_lr
    tdabench groundtruth --benchmark mnist_lr --kind lds      # shards through the launcher
    tdabench merge       --benchmark mnist_lr --kind lds
    tdabench attribute   --benchmark mnist_lr --method if_cg
    tdabench evaluate    --benchmark mnist_lr --method if_cg
    tdabench report
    tdabench install-profile --account LAB --partition gpu    # ~/.config/snakemake/slurm/
    tdabench verify results/mnist_lr/models [--expect-key benchmark=mnist_lr]  # checksums

``python -m tdabench.pipeline`` is the same program. ``--log FILE`` writes the stage's log there
(and to stderr). ``TDABENCH_STAGES`` selects the module with the stage bodies (default
``tdabench.pipeline.stages``; ``toy_stages`` of ``tests/pipeline`` for the pipeline's own tests).
``groundtruth --launcher JSON`` is where its shards run (``LauncherSettings.to_json()``: the
Snakefile builds it from the config and the profile's resources, never as params, so where shards
run never changes what a rule computes); without it, the config's ``launcher`` block applies.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

logger = logging.getLogger("tdabench.pipeline.cli")


def _stages() -> Any:
    return importlib.import_module(os.environ.get("TDABENCH_STAGES", "tdabench.pipeline.stages"))


def _setup_logging(log: str | None, verbose: bool) -> None:
    # the rule's log file gets the whole story (tdabench.pipeline.logs; pipelogs engineer)
    from tdabench.pipeline.logs import setup_logging

    setup_logging(log, verbose)


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    from tdabench.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. launcher.kind=debug)")
        key, value = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


DEFAULT_CONFIG = "configs/default.yaml"


def _layered_config(path: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``path`` layered on ``configs/default.yaml``, then ``overrides``: what Snakemake resolves
    for ``snakemake --configfile PATH --config ...`` (the Snakefile's configfile is the default)."""
    from tdabench.pipeline.config import deep_merge, load_yaml, resolve_config

    default = Path(DEFAULT_CONFIG)
    if default.is_file() and Path(path).resolve() != default.resolve():
        raw = deep_merge(load_yaml(default), load_yaml(path))
        source = f"{path} (layered on {DEFAULT_CONFIG})"
    else:
        raw, source = load_yaml(path), str(path)
    if overrides:
        raw, source = deep_merge(raw, overrides), source + " with --set overrides"
    return resolve_config(raw, source)


class _Ctx:
    """Lazily loaded configuration (only when a stage is run by hand)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._cfg: dict[str, Any] | None = None

    @property
    def cfg(self) -> dict[str, Any]:
        if self._cfg is None:
            self._cfg = _layered_config(self.args.config, _parse_set(self.args.set))
        return self._cfg

    def need(self, name: str) -> str:
        from tdabench.errors import ConfigError

        value = getattr(self.args, name, None)
        if value is None:
            raise ConfigError(f"--{name.replace('_', '-')} is required when --spec is not given")
        return value

    def path(self, name: str, default: Any) -> Any:
        """``--<name>``, else ``default()`` from the config; with ``--spec`` it is required."""
        from tdabench.errors import ConfigError

        value = getattr(self.args, name, None)
        if value is not None:
            return value
        if self.args.spec:
            raise ConfigError(
                f"--{name.replace('_', '-')} is required with --spec (the spec carries no "
                "paths); pass it, or drop --spec to take the paths from --config"
            )
        return default()

    def spec(self, stage: str, **sel: Any) -> dict[str, Any]:
        if self.args.spec:
            return _parse_spec(self.args.spec, stage)
        from tdabench.pipeline.config import stage_spec

        return stage_spec(self.cfg, stage, self.args.benchmark, **sel)

    def paths(self) -> dict[str, Any]:
        from tdabench.pipeline.config import paths

        return paths(self.cfg, self.need("benchmark"))

    def launcher(self) -> Any:
        """``--launcher JSON`` (the rules pass it), else the config's ``launcher`` block."""
        from tdabench.pipeline.launcher import LauncherSettings

        if self.args.launcher is not None:
            settings = LauncherSettings.from_json(self.args.launcher)
        else:
            settings = LauncherSettings.from_dict(self.cfg["launcher"])
        logger.info("launcher settings: %s", settings.to_json())
        return settings

    def device(self) -> str:
        """``--device``, checked before any work (ConfigError for an unknown device)."""
        from tdabench.pipeline.stages._common import device

        device(self.args.device)
        return self.args.device


#: Top-level keys every stage spec has (``tdabench <stage> --spec``), and its ``stage`` value.
_SPEC_KEYS = {
    "prepare": ("prepare", ("setting", "overrides", "data", "data_root", "auc")),
    "train": ("train", ("prepare", "recipe", "train")),
    "groundtruth": ("groundtruth", ("kind", "setting", "overrides", "data", "recipe", "spec")),
    "merge": ("groundtruth", ("kind", "setting", "overrides", "data", "recipe", "spec")),
    "attribute": ("attribute", ("train", "method", "attributor", "num_test")),
    "evaluate": ("evaluate", ("method", "metrics", "targets", "evaluate")),
    "brittleness": ("brittleness", ("method", "attribute", "brittleness")),
    "report": ("report", ("benchmarks", "report")),
}


def _parse_spec(text: str, stage: str) -> dict[str, Any]:
    """``--spec JSON`` (or ``@file``), checked to be a complete spec of ``stage``."""
    from tdabench.errors import ConfigError

    fix = f"pass the spec the workflow generates (config.stage_spec(cfg, {stage!r}, ...))"
    try:
        raw = Path(text[1:]).read_text() if text.startswith("@") else text
        spec = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--spec is not readable JSON ({exc}); {fix}") from exc
    want_stage, keys = _SPEC_KEYS[stage]
    if not isinstance(spec, dict):
        raise ConfigError(f"--spec must be a JSON object, got {type(spec).__name__}; {fix}")
    missing = [k for k in keys if k not in spec]
    if missing or spec.get("stage") != want_stage:
        raise ConfigError(
            f"--spec is not a complete {stage} spec (stage {spec.get('stage')!r}, missing keys "
            f"{missing}); {fix}"
        )
    return spec


def _or(value: Any, default: Any) -> Any:
    return default() if value is None else value


def cmd_check_config(ctx: _Ctx) -> int:
    from tdabench.pipeline.config import groundtruth_kinds, paths
    from tdabench.pipeline.stages.check import check_config

    cfg = ctx.cfg
    warnings = check_config(cfg)  # every setting, recipe, model and attributor, nothing run
    print(f"{ctx.args.config}: OK")
    for b in cfg["benchmarks"]:
        bc = cfg["benchmark_configs"][b]
        p = paths(cfg, b)
        gt = ", ".join(
            f"{k}: {p['groundtruth'][k]['count']} in {p['groundtruth'][k]['dir']}"
            for k in groundtruth_kinds(cfg, b)
        )
        print(
            f"  {b} (setting {bc['setting']}; metrics {', '.join(bc['metrics'])}; "
            f"{len(bc['attributors'])} attributors; ground truth {gt or 'none'})"
        )
    print(f"  launcher: kind={cfg['launcher']['kind']}")
    for w in warnings:
        print(f"  warning: {w}")
    return 0


def cmd_prepare(ctx: _Ctx) -> int:
    spec = ctx.spec("prepare")
    out = ctx.path("out_dir", lambda: ctx.paths()["data"])
    _stages().prepare(spec, out, benchmark=ctx.args.benchmark)
    return 0


def cmd_train(ctx: _Ctx) -> int:
    a = ctx.args
    spec = ctx.spec("train")
    _stages().train(
        spec,
        ctx.path("data", lambda: ctx.paths()["data"]),
        ctx.path("out_dir", lambda: ctx.paths()["models"]),
        device=ctx.device(),
        benchmark=a.benchmark,
    )
    return 0


def _gt_paths(ctx: _Ctx, kind: str | None) -> dict[str, Any]:
    from tdabench.errors import ConfigError

    gts = ctx.paths()["groundtruth"]
    if kind not in gts:
        raise ConfigError(
            f"benchmark {ctx.args.benchmark!r} has no {kind} ground truth (its metrics need "
            f"{sorted(gts) or 'none'}); pick one of those kinds"
        )
    return gts[kind]


def _gt_stage(ctx: _Ctx, stage: str) -> tuple[dict[str, Any], Any]:
    """``(spec, paths getter)`` of a ground-truth stage (``--kind`` needed without ``--spec``)."""
    kind = ctx.need("kind") if not ctx.args.spec else None
    return ctx.spec(stage, kind=kind), lambda name: _gt_paths(ctx, kind)[name]


def cmd_groundtruth(ctx: _Ctx) -> int:
    spec, gt = _gt_stage(ctx, "groundtruth")
    _stages().groundtruth(
        spec,
        int(ctx.path("count", lambda: gt("count"))),
        ctx.path("store", lambda: gt("dir")),
        ctx.path("out", lambda: gt("complete")),
        launcher=ctx.launcher(),
        device=ctx.device(),
        benchmark=ctx.args.benchmark,
    )
    return 0


def cmd_merge(ctx: _Ctx) -> int:
    spec, gt = _gt_stage(ctx, "merge")
    complete = ctx.path("complete", lambda: gt("complete"))
    out = ctx.path("out", lambda: gt("merged"))
    _stages().merge(spec, complete, out, benchmark=ctx.args.benchmark)
    return 0


def cmd_attribute(ctx: _Ctx) -> int:
    a = ctx.args
    method = ctx.need("method") if not a.spec else None
    spec = ctx.spec("attribute", method=method)
    metrics = a.metrics.split(",") if a.metrics else None
    if metrics is None and not a.spec:
        metrics = ctx.cfg["benchmark_configs"][a.benchmark]["metrics"]
    _stages().attribute(
        spec,
        ctx.path("data", lambda: ctx.paths()["data"]),
        ctx.path("models", lambda: ctx.paths()["models"]),
        ctx.path("out", lambda: ctx.paths()["scores"][method]),
        ctx.path("out_self", lambda: ctx.paths()["self_scores"][method]),
        metrics=metrics,
        device=ctx.device(),
        benchmark=a.benchmark,
    )
    return 0


def _gt_args(ctx: _Ctx) -> dict[str, str]:
    from tdabench.errors import ConfigError

    if not ctx.args.gt:
        return ctx.path(
            "gt", lambda: {k: v["merged"] for k, v in ctx.paths()["groundtruth"].items()}
        )
    out = {}
    for item in ctx.args.gt:
        kind, sep, path = item.partition("=")
        if not sep or kind not in ("lds", "loo") or not path:
            raise ConfigError(f"--gt {item!r}: expected lds=PATH or loo=PATH")
        out[kind] = path
    return out


def _method_stage(ctx: _Ctx, stage: str) -> tuple[dict[str, Any], str]:
    """``(spec, method)`` of a per-method stage (``--method`` needed without ``--spec``)."""
    spec = ctx.spec(stage, method=ctx.need("method") if not ctx.args.spec else None)
    return spec, spec["method"]


def cmd_evaluate(ctx: _Ctx) -> int:
    spec, method = _method_stage(ctx, "evaluate")
    p = ctx.paths
    _stages().evaluate(
        spec,
        ctx.need("benchmark"),
        ctx.path("scores", lambda: p()["scores"][method]),
        ctx.path("self_scores", lambda: p()["self_scores"][method]),
        _gt_args(ctx),
        ctx.path("noisy", lambda: p()["noisy"]),
        ctx.path("out", lambda: p()["metrics"][method]),
        ctx.path("curves_out", lambda: str(Path(p()["root"]) / "plots" / f"{method}.json")),
    )
    return 0


def cmd_brittleness(ctx: _Ctx) -> int:
    spec, method = _method_stage(ctx, "brittleness")
    p = ctx.paths

    def planned() -> dict[str, str]:
        from tdabench.errors import ConfigError

        entry = p().get("brittleness", {}).get(method)
        if entry is None:
            raise ConfigError(
                f"benchmark {ctx.args.benchmark!r} does not list brittleness in its metrics; add it, or pass "
                "--scores, --store and --out"
            )
        return entry

    _stages().brittleness(
        spec,
        ctx.need("benchmark"),
        ctx.path("scores", lambda: p()["scores"][method]),
        ctx.path("out", lambda: planned()["out"]),
        ctx.path("store", lambda: planned()["store"]),
        ctx.device(),
    )
    return 0


def _metric_args(items: list[str]) -> dict[str, dict[str, str]]:
    """``["bench:method=path", ...]`` -> ``{bench: {method: path}}`` (ConfigError if garbled)."""
    from tdabench.errors import ConfigError

    metrics: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, path = item.partition("=")
        b, colon, m = key.partition(":")
        if not (sep and colon and b and m and path):
            raise ConfigError(f"--metrics {item!r}: expected BENCHMARK:METHOD=PATH")
        metrics.setdefault(b, {})[m] = path
    return metrics


def cmd_report(ctx: _Ctx) -> int:
    a = ctx.args
    spec = ctx.spec("report")
    if a.metrics:
        metrics = _metric_args(a.metrics)
    else:
        from tdabench.pipeline.config import paths

        metrics = {b: paths(ctx.cfg, b)["metrics"] for b in ctx.cfg["benchmarks"]}
    results = Path(a.out_md).parent if a.out_md else Path(ctx.cfg["results_dir"])
    _stages().report(
        spec,
        metrics,
        _or(a.out_md, lambda: str(results / "report.md")),
        _or(a.out_html, lambda: str(results / "report.html")),
        _or(a.plots_dir, lambda: str(results / "plots")),
        _or(a.summary, lambda: str(results / "summary.csv")),
        curves=_metric_args(a.curves or []) or None,
        groundtruth=dict(item.split("=", 1) for item in a.gt_complete or []),
        context=json.loads(a.context) if a.context else None,
    )
    return 0


def cmd_install_profile(ctx: _Ctx) -> int:
    from tdabench.pipeline.profile import install_profile

    a = ctx.args
    options = ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism")
    dest = install_profile(
        a.account,
        a.partition,
        a.dest,
        jobs=a.jobs,
        force=a.force,
        cluster_check=not a.no_cluster_check,
        **{k: getattr(a, k) for k in options},
    )
    print(f"installed the slurm profile in {dest}; run: snakemake --profile slurm")
    return 0


def cmd_verify(ctx: _Ctx) -> int:
    """Verify checksums (and ``--expect-key`` provenance) of outputs; exit 2 on any problem."""
    from tdabench._io import verify_output
    from tdabench.errors import ConfigError

    expect: dict[str, str] = {}
    for item in ctx.args.expect_key:
        if "=" not in item:
            raise ConfigError(
                f"--expect-key {item!r}: expected FIELD=VALUE (e.g. benchmark=mnist_lr)"
            )
        k, v = item.split("=", 1)
        expect[k] = v
    for path in ctx.args.paths:
        checked = verify_output(path, expect or None)
        print(f"{path}: OK ({len(checked)} file(s) verified)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``tdabench`` (one sub-command per stage)."""
    p = argparse.ArgumentParser(prog="tdabench", description="tdabench pipeline stages")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, fn: Any, help: str, repeat: str, metavar: str, what: str) -> Any:
        """A sub-command with ``--log``, ``--verbose`` and one repeatable option."""
        s = sub.add_parser(name, help=help)
        s.add_argument(repeat, action="append", default=[], metavar=metavar, help=what)
        s.add_argument("--log", help="also write the log to this file")
        s.add_argument("--verbose", action="store_true")
        s.set_defaults(fn=fn)
        return s

    def stage(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        what = "override a config value (dotted key, YAML value); repeatable"
        s = command(name, fn, help, "--set", "KEY=VALUE", what)
        s.add_argument("--config", default="configs/default.yaml", help="run configuration file")
        s.add_argument("--spec", help="the stage spec as JSON (or @file); the rules pass it")
        s.add_argument("--benchmark", help="benchmark name (configs/benchmarks/<name>.yaml)")
        return s

    stage("check-config", cmd_check_config, "validate the configuration and print what it computes")
    s = stage("prepare", cmd_prepare, "load the split, record its identity, flip labels for AUC")
    s.add_argument("--out-dir")
    s = stage(
        "train", cmd_train, "train the reference models (ensemble, checkpoints, noisy-label model)"
    )
    s.add_argument("--data")
    s.add_argument("--out-dir")
    s.add_argument("--device", default="auto")
    s = stage("groundtruth", cmd_groundtruth, "retrain LOO/LDS shards through the launcher")
    s.add_argument("--kind", choices=["lds", "loo"])
    s.add_argument("--count", type=int, help="removals (loo) or subsets (lds)")
    s.add_argument("--store", help="ground-truth store directory")
    s.add_argument("--out", help="complete-<n>.json, written when every shard is done")
    s.add_argument("--device", default="auto")
    s.add_argument(
        "--launcher",
        metavar="JSON",
        help="where shards run, as LauncherSettings.to_json() (default: the config's launcher)",
    )
    s = stage("merge", cmd_merge, "merge a store's shards into one Parquet file")
    s.add_argument("--kind", choices=["lds", "loo"])
    s.add_argument("--complete")
    s.add_argument("--out")
    s = stage("attribute", cmd_attribute, "run one attributor on one benchmark")
    s.add_argument("--method", help="attributor name (configs/attributors/<name>.yaml)")
    s.add_argument("--data")
    s.add_argument("--models")
    s.add_argument("--out")
    s.add_argument("--out-self")
    s.add_argument("--metrics", help="comma-separated metrics (self-scores only when auc is in it)")
    s.add_argument("--device", default="auto")
    s = stage("evaluate", cmd_evaluate, "LDS / LOO / AUC of one attributor on one benchmark")
    s.add_argument("--method")
    s.add_argument("--scores")
    s.add_argument("--self-scores")
    s.add_argument(
        "--gt", action="append", metavar="KIND=PATH", help="merged ground truth; repeatable"
    )
    s.add_argument("--noisy")
    s.add_argument("--out")
    s.add_argument("--curves-out")
    s = stage(
        "brittleness",
        cmd_brittleness,
        "fewest top-attributed removals that flip a prediction (retrains)",
    )
    s.add_argument("--method")
    s.add_argument("--scores")
    s.add_argument("--store", help="brittleness store directory (keyed, resumable)")
    s.add_argument("--out")
    s.add_argument("--device", default="auto")
    s = stage("report", cmd_report, "results/report.md + report.html + plots")
    s.add_argument("--metrics", action="append", metavar="BENCH:METHOD=PATH")
    s.add_argument("--curves", action="append", metavar="BENCH:METHOD=PATH")
    s.add_argument("--gt-complete", action="append", metavar="BENCH/KIND=PATH")
    s.add_argument("--context", help="JSON: configfiles and hyperparameters (provenance)")
    s.add_argument("--out-md")
    s.add_argument("--out-html")
    s.add_argument("--plots-dir")
    s.add_argument("--summary")
    s = stage(
        "install-profile",
        cmd_install_profile,
        "install the slurm Snakemake profile for your lab into ~/.config/snakemake/slurm",
    )
    s.add_argument("--account", required=True)
    s.add_argument("--partition", required=True)
    s.add_argument("--dest", help="default: ~/.config/snakemake/slurm")
    s.add_argument("--gpus-per-node", type=int, default=1)
    s.add_argument("--cpus-per-task", type=int, default=4)
    s.add_argument("--mem-gb", type=float, default=16)
    s.add_argument("--timeout-min", type=int, default=240)
    s.add_argument("--array-parallelism", type=int, default=32)
    s.add_argument("--jobs", type=int, default=50, help="concurrent Snakemake jobs")
    s.add_argument("--force", action="store_true", help="overwrite an existing profile")
    s.add_argument(
        "--no-cluster-check",
        action="store_true",
        help="do not check the request against the partition (sinfo / scontrol)",
    )
    s = command(
        "verify",
        cmd_verify,
        "verify stage outputs' checksums and provenance (non-zero exit on a problem)",
        "--expect-key",
        "FIELD=VALUE",
        "provenance field every file must carry (e.g. benchmark=mnist_lr); repeatable",
    )
    s.add_argument("paths", nargs="+", metavar="PATH", help="output files or directories")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tdabench`` console script."""
    from tdabench.errors import TdabenchError

    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log", None), getattr(args, "verbose", False))
    t0 = time.perf_counter()
    logger.info("tdabench %s started: %s", args.command, " ".join(argv or sys.argv[1:]))
    try:
        rc = args.fn(_Ctx(args))
    except TdabenchError as exc:  # the log file keeps the traceback, the console one line
        logger.error("%s: %s", type(exc).__name__, exc, exc_info=exc)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            logger.error("tdabench %s failed: %r", args.command, exc, exc_info=exc)
            raise
        logger.error("DiskFullError: disk full at %r (%s); free space and rerun", exc.filename, exc)
        return 2
    except Exception as exc:
        logger.error("tdabench %s failed: %r", args.command, exc, exc_info=exc)
        raise
    logger.info("tdabench %s done in %.1f s", args.command, time.perf_counter() - t0)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
