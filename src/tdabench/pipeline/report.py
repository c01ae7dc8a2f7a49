"""The benchmark report: ``report.md``, a self-contained ``report.html``, ``summary.csv`` and plots.

The report reads only the files it is given (metrics JSON and evaluate's curves JSON per
benchmark x method, the ground-truth completion records), so the Snakemake rule declares every one
of them as an input, and verifies each metrics and curves file's checksum and provenance
(benchmark, method) before using it. ``report.html`` embeds its images as ``data:`` URIs: sent alone, it shows
everything. It says what each metric means, and carries the run's provenance: the configuration
files, the code commit and its date, the ground-truth keys, the hardware, and how every
hyper-parameter was chosen. The HTML and Markdown are byte-identical for identical inputs; the build
time and host go to a sidecar ``<report.html>.run.json`` that DVC does not track; attribution
times come from the metrics files' sidecars.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tdabench._io import atomic_path, read_json, read_json_checked, read_sidecar, write_sidecar

__all__ = ["METRIC_HELP", "PLOT_CAPTIONS", "hardware", "render_report", "revision"]

#: What each column of the table means (shown in the HTML and the Markdown).
METRIC_HELP: dict[str, str] = {
    "LDS": (
        "Linear datamodeling score: for each test point, the Spearman correlation, over random "
        "half-size training subsets, between the sum of the method's scores over a subset and the "
        "target (margin) of a model retrained on that subset; averaged over test points. 1 is "
        "perfect, 0 is chance."
    ),
    "95% CI": "Percentile bootstrap confidence interval of the LDS over test points.",
    "noise ceiling": (
        "The best LDS any method can reach given the ground truth's own retraining noise "
        "(from independent retraining seeds per subset)."
    ),
    "LOO corr": (
        "Pearson correlation, per test point, between the scores of the removed training points "
        "and the test loss of the models retrained without each of them; averaged over test points."
    ),
    "AUC": (
        "Mislabel detection: ROC AUC of ranking training points by self-influence when a fraction "
        "of the training labels is flipped (0.5 is chance)."
    ),
    "time (s)": "Wall time of the method's cache + attribute calls (one job, the stated hardware).",
}

#: Caption of every plot the report draws, by file stem.
PLOT_CAPTIONS: dict[str, str] = {
    "lds_bars": (
        "LDS per method (bars) with its 95% bootstrap CI (whiskers); dashed: the ground truth's "
        "noise ceiling. Higher is better."
    ),
    "loo_bars": "LOO correlation per method with its 95% bootstrap CI. Higher is better.",
    "mislabel_roc": (
        "Mislabel detection ROC: training points ranked by self-influence; the legend gives the "
        "AUC. Dotted: chance."
    ),
    "loo_scatter": (
        "LOO effect on one test point: x = the method's score of each removed training point, "
        "y = the LOO effect, loss of the model trained without that point minus the full model's "
        "loss. A good method puts the points on a rising line."
    ),
}

_COLUMNS = ("benchmark", "method", "LDS", "95% CI", "noise ceiling", "LOO corr", "AUC", "time (s)")
_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em}"
    "table{border-collapse:collapse;max-width:100%}td,th{border:1px solid #ccc;padding:3px 8px}"
    "figure{margin:1.5em 0}img{max-width:100%;height:auto}figcaption{font-size:.9em;color:#333}"
    "dt{font-weight:bold}code{word-break:break-all}"
)


def _fmt(x: Any, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def revision() -> dict[str, str]:
    """The code revision (``git describe --always --dirty``) and its commit date (ISO 8601)."""
    cwd = Path(__file__).resolve().parent
    out = {"commit": "unknown", "commit_date": "unknown"}
    for key, cmd in (
        ("commit", ["git", "describe", "--always", "--dirty", "--abbrev=12"]),
        ("commit_date", ["git", "log", "-1", "--format=%cI"]),
    ):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
            out[key] = res.stdout.strip() or out[key]
    return out


def hardware() -> dict[str, Any]:
    """CPU model and count, and the GPUs ``nvidia-smi`` lists (empty when there is none)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpus: list[str] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        gpus = [g.strip() for g in res.stdout.splitlines() if g.strip()]
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpus": gpus, "os": platform.platform()}


def _read_checked(path: str, benchmark: str, method: str, what: str) -> dict[str, Any]:
    body = read_json_checked(path, what=what)
    prov = body.pop("provenance", None) or {}
    for key, want in (("benchmark", benchmark), ("method", method)):
        found = prov.get(key, want)
        if found != want:
            from tdabench.errors import ProvenanceError

            raise ProvenanceError(
                f"{what} {path!r} belongs to {key} {found!r}, not {want!r}; "
                "delete it and rerun the workflow"
            )
    body.pop("sha256", None)
    body["_provenance"] = prov
    return body


def _rows(
    metrics: Mapping[str, Mapping[str, str]], curves: Mapping[str, Mapping[str, str]] | None
) -> list[dict[str, Any]]:
    rows = []
    for b, per_method in metrics.items():
        for m, path in per_method.items():
            r = _read_checked(path, b, m, "metrics")
            side = read_sidecar(path)
            secs = side.get(
                "attribution_seconds", (side.get("facts") or {}).get("attribution_seconds")
            )
            r.setdefault("attribution_seconds", secs)
            cpath = (curves or {}).get(b, {}).get(m)
            if cpath is None:  # results/metrics/<b>/<m>.json -> results/<b>/plots/<m>.json
                cpath = str(Path(path).parents[2] / b / "plots" / f"{m}.json")
            r["_curves"] = _read_checked(cpath, b, m, "curves") if Path(cpath).exists() else {}
            r.setdefault("benchmark", b)
            r.setdefault("method", m)
            rows.append(r)
    return rows


def _cells(r: Mapping[str, Any]) -> list[str]:
    lds_e, loo_e, auc_e = r.get("lds", {}), r.get("loo", {}), r.get("auc", {})
    return [
        str(r["benchmark"]),
        str(r["method"]),
        _fmt(lds_e.get("value")),
        f"[{_fmt(lds_e.get('ci_low'))}, {_fmt(lds_e.get('ci_high'))}]",
        _fmt(lds_e.get("noise_ceiling")),
        _fmt(loo_e.get("value")),
        _fmt(auc_e.get("value")),
        _fmt(r.get("attribution_seconds"), 1),
    ]


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["benchmark,method,lds,lds_ci_low,lds_ci_high,noise_ceiling,loo,auc,seconds"]
    for r in rows:
        lds_e, loo_e, auc_e = r.get("lds", {}), r.get("loo", {}), r.get("auc", {})
        vals = (
            r["benchmark"],
            r["method"],
            lds_e.get("value", ""),
            lds_e.get("ci_low", ""),
            lds_e.get("ci_high", ""),
            lds_e.get("noise_ceiling", ""),
            loo_e.get("value", ""),
            auc_e.get("value", ""),
            r.get("attribution_seconds", ""),
        )
        lines.append(",".join("" if v is None else str(v) for v in vals))
    return "\n".join(lines) + "\n"


def _provenance(
    spec: Mapping[str, Any], context: Mapping[str, Any], gt_keys: Mapping[str, str]
) -> dict[str, Any]:
    return {
        "configuration": context.get("configfiles") or ["configs/default.yaml"],
        **revision(),
        "ground-truth keys": dict(gt_keys) or "not recorded",
        "hardware": hardware(),
        "benchmarks": list(spec.get("benchmarks", [])),
        "hyper-parameters": context.get("hyperparameters") or {},
    }


def _gt_keys(groundtruth: Mapping[str, str] | None) -> dict[str, str]:
    keys = {}
    for name, path in sorted((groundtruth or {}).items()):
        with contextlib.suppress(OSError, ValueError, KeyError):
            keys[name] = str(read_json(path)["key"])
    return keys


def render_report(
    spec: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, str]],
    out_md: str,
    out_html: str,
    plots_dir: str,
    summary_csv: str,
    *,
    curves: Mapping[str, Mapping[str, str]] | None = None,
    groundtruth: Mapping[str, str] | None = None,
    context: Mapping[str, Any] | None = None,
) -> None:
    """Write the report's Markdown, self-contained HTML, CSV summary and PNG plots.

    Args:
        spec: the report stage's spec (``benchmarks``, ``attributors``, ``report`` options).
        metrics: ``{benchmark: {method: path of results/metrics/<b>/<method>.json}}``.
        out_md, out_html, plots_dir, summary_csv: output paths.
        curves: ``{benchmark: {method: path of evaluate's curves JSON}}``; default: the path
            next to the metrics (``results/<b>/plots/<method>.json``).
        groundtruth: ``{"<benchmark>/<kind>": path of complete-<n>.json}``, for the keys.
        context: ``configfiles`` (list of config paths) and ``hyperparameters``
            (``{attributor: {"params": ..., "chosen": how}}``), shown as provenance.
    """
    rows = _rows(metrics, curves)
    keys = _gt_keys(groundtruth)
    for r in rows:  # evaluate records the keys of the ground truth it used
        for kind, key in (r["_provenance"].get("groundtruth_keys") or {}).items():
            keys.setdefault(f"{r['benchmark']}/{kind}", str(key))
    prov = _provenance(spec, context or {}, keys)
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    images = _plots(rows, plots) if spec.get("report", {}).get("plots", True) else []
    md = _markdown(rows, images, Path(out_md).parent, prov)
    with atomic_path(out_md) as tmp:
        tmp.write_text(md)
    with atomic_path(summary_csv) as tmp:
        tmp.write_text(_csv(rows))
    with atomic_path(out_html) as tmp:
        tmp.write_text(_html(rows, images, prov))
    write_sidecar(out_html)


def _markdown(
    rows: Sequence[Mapping[str, Any]], images: Sequence[Path], base: Path, prov: Mapping[str, Any]
) -> str:
    lines = ["# tdabench report", "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * 8]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines += ["", "## What the metrics mean", ""]
    lines += [f"- **{k}**: {v}" for k, v in METRIC_HELP.items()]
    lines += ["", "## Plots", ""]
    for p in images:
        lines += [f"![{p.stem}]({os.path.relpath(p, base)})", "", f"*{PLOT_CAPTIONS[p.stem]}*", ""]
    lines += ["## Provenance", "", "```json", json.dumps(prov, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html(
    rows: Sequence[Mapping[str, Any]], images: Sequence[Path], prov: Mapping[str, Any]
) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in _COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(v)}</td>" for v in _cells(r)) + "</tr>" for r in rows
    )
    helps = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in METRIC_HELP.items())
    figs = "".join(
        f'<figure><img src="{_data_uri(p)}" alt="{esc(p.stem)}">'
        f"<figcaption>{esc(PLOT_CAPTIONS[p.stem])}</figcaption></figure>"
        for p in images
    )
    prov_rows = "".join(
        f"<tr><th>{esc(k)}</th><td><code>{esc(v if isinstance(v, str) else json.dumps(v, sort_keys=True))}"
        "</code></td></tr>"
        for k, v in sorted(prov.items())
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width'><title>tdabench report</title>"
        f"<style>{_CSS}</style></head><body><h1>tdabench report</h1>"
        f"<table><tr>{head}</tr>{body}</table><h2>What the metrics mean</h2><dl>{helps}</dl>"
        f"<h2>Plots</h2>{figs}<h2>Provenance</h2><table>{prov_rows}</table></body></html>\n"
    )


def _panels(rows: Sequence[Mapping[str, Any]], height: float) -> tuple[Any, list[Any]]:
    """One panel per benchmark: ``(figure, [(axes, benchmark, its rows), ...])``."""
    import matplotlib.pyplot as plt

    benches = sorted({r["benchmark"] for r in rows})
    fig, axes = plt.subplots(
        1, len(benches), figsize=(min(12, 4.5 * len(benches)), height), squeeze=False
    )
    per = [[r for r in rows if r["benchmark"] == b] for b in benches]
    return fig, list(zip(axes[0], benches, per, strict=False))


def _save(fig: Any, path: Path) -> bool:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return True


def _bars(rows: Sequence[Mapping[str, Any]], metric: str, title: str, path: Path) -> bool:
    data = [r for r in rows if metric in r]
    if not data:
        return False
    fig, panels = _panels(data, 3.6)
    for ax, b, rs in panels:
        vals = [r[metric]["value"] for r in rs]
        err = [
            [
                max(0.0, r[metric]["value"] - r[metric].get("ci_low", r[metric]["value"]))
                for r in rs
            ],
            [
                max(0.0, r[metric].get("ci_high", r[metric]["value"]) - r[metric]["value"])
                for r in rs
            ],
        ]
        ax.bar([r["method"] for r in rs], vals, yerr=err, capsize=3, color="tab:blue")
        ceil = [
            r[metric]["noise_ceiling"] for r in rs if r[metric].get("noise_ceiling") is not None
        ]
        if ceil:
            ax.axhline(ceil[0], color="k", ls="--", lw=1, label="noise ceiling")
            ax.legend(fontsize=7)
        ax.set_title(b, fontsize=9)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def _roc(rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    roc = [r for r in rows if "roc" in r["_curves"] and "auc" in r]
    if not roc:
        return False
    fig, panels = _panels(roc, 3.8)
    for ax, b, rs in panels:
        for r in rs:
            c = r["_curves"]["roc"]
            ax.plot(c["fpr"], c["tpr"], lw=1, label=f"{r['method']} ({r['auc']['value']:.2f})")
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{b}: mislabel detection", fontsize=9)
        ax.legend(fontsize=6)
    return _save(fig, path)


def loo_effect(curve: Mapping[str, Any]) -> tuple[list[float], str]:
    """The LOO effect of evaluate's ``loo_scatter`` curve and the y-axis label to show with it.

    The effect is the loss of the model trained without sample i minus the full model's loss
    (``full_loss``, when evaluate recorded it). Without it, the losses are shown relative to
    their median, which moves every point by one constant and says so on the axis.
    """
    losses = [float(v) for v in curve.get("loo_loss", curve.get("loo_effect", []))]
    full = curve.get("full_loss")
    if full is not None:
        return [v - float(full) for v in losses], "loss without i - full model's loss"
    if not losses:
        return [], "LOO effect"
    mid = sorted(losses)[len(losses) // 2]
    return [v - mid for v in losses], "loss without i - median (full loss not recorded)"


def _scatter(rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    import matplotlib.pyplot as plt

    scatter = [r for r in rows if "loo_scatter" in r["_curves"]]
    if not scatter:
        return False
    cols = min(len(scatter), 4)
    nrows = math.ceil(len(scatter) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.6 * nrows), squeeze=False)
    for ax, r in zip(axes.ravel(), scatter, strict=False):
        c = r["_curves"]["loo_scatter"]
        y, label = loo_effect(c)
        ax.scatter(c["score"], y, s=6)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_title(f"{r['benchmark']}/{r['method']}", fontsize=8)
        ax.set_xlabel("score", fontsize=7)
        ax.set_ylabel(label, fontsize=6)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(scatter) :]:
        ax.axis("off")
    return _save(fig, path)


def _plots(rows: Sequence[Mapping[str, Any]], plots: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    made: list[Path] = []
    for stem, draw in (
        ("lds_bars", lambda p: _bars(rows, "lds", "Linear datamodeling score", p)),
        ("loo_bars", lambda p: _bars(rows, "loo", "LOO correlation", p)),
        ("mislabel_roc", lambda p: _roc(rows, p)),
        ("loo_scatter", lambda p: _scatter(rows, p)),
    ):
        path = plots / f"{stem}.png"
        if draw(path):
            made.append(path)
        else:
            path.unlink(missing_ok=True)
    return made
