"""The benchmark report: ``report.md``, ``report.html``, ``summary.csv`` and PNG plots.

Reads the metrics JSON files (and evaluate's curves next to them); attribution times come from
the metrics files' sidecars (``<metrics>.json.run.json``), since timings are volatile and stay
out of the DVC-tracked outputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdabench._io import atomic_path, read_json, read_sidecar

__all__ = ["render_report"]


def render_report(
    spec: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, str]],
    out_md: str,
    out_html: str,
    plots_dir: str,
    summary_csv: str,
    **inputs: Any,
) -> None:
    """Table (method x benchmark: LDS +- CI, noise ceiling, LOO, AUC, time) and PNG plots.

    Args:
        metrics: ``{benchmark: {method: path of results/metrics/<b>/<method>.json}}`` (curves are
            read from ``results/<b>/plots/<method>.json``).
    """
    rows = []
    for b, per_method in metrics.items():
        for m, path in per_method.items():
            r = read_json(path)
            r.setdefault("attribution_seconds", read_sidecar(path).get("attribution_seconds"))
            # results/metrics/<b>/<m>.json -> results/<b>/plots/<m>.json
            curves_path = Path(path).parents[2] / b / "plots" / f"{m}.json"
            r["_curves"] = read_json(curves_path) if curves_path.exists() else {}
            rows.append(r)

    def fmt(x: Any, nd: int = 3) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"

    header = "| benchmark | method | LDS | 95% CI | noise ceiling | LOO corr | AUC | time (s) |"
    lines = ["# tdabench report", "", header, "|" + "---|" * 8]
    csv = ["benchmark,method,lds,lds_ci_low,lds_ci_high,noise_ceiling,loo,auc,seconds"]
    for r in rows:
        lds_e, loo_e, auc_e = r.get("lds", {}), r.get("loo", {}), r.get("auc", {})
        lines.append(
            f"| {r['benchmark']} | {r['method']} | {fmt(lds_e.get('value'))} | "
            f"[{fmt(lds_e.get('ci_low'))}, {fmt(lds_e.get('ci_high'))}] | "
            f"{fmt(lds_e.get('noise_ceiling'))} | {fmt(loo_e.get('value'))} | "
            f"{fmt(auc_e.get('value'))} | {fmt(r.get('attribution_seconds'), 1)} |"
        )
        csv.append(
            ",".join(
                str(x)
                for x in (
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
            )
        )
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    images = _plots(rows, plots) if spec.get("report", {}).get("plots", True) else []
    lines += ["", *[f"![{p.stem}]({os.path.relpath(p, Path(out_md).parent)})" for p in images], ""]
    md = "\n".join(lines)
    with atomic_path(out_md) as tmp:
        tmp.write_text(md)
    with atomic_path(summary_csv) as tmp:
        tmp.write_text("\n".join(csv) + "\n")
    html = _html(rows, images, Path(out_html).parent, fmt)
    with atomic_path(out_html) as tmp:
        tmp.write_text(html)


def _plots(rows: list[dict[str, Any]], plots: Path) -> list[Path]:
    import matplotlib  # only the report needs it: imported on use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    benches = sorted({r["benchmark"] for r in rows})
    for metric, title in (("lds", "Linear datamodeling score"), ("loo", "LOO correlation")):
        data = [r for r in rows if metric in r]
        if not data:
            continue
        fig, axes = plt.subplots(1, len(benches), figsize=(4.5 * len(benches), 3.5), squeeze=False)
        for ax, b in zip(axes[0], benches, strict=False):
            rs = [r for r in data if r["benchmark"] == b]
            vals = [r[metric]["value"] for r in rs]
            err = [
                [r[metric]["value"] - r[metric]["ci_low"] for r in rs],
                [r[metric]["ci_high"] - r[metric]["value"] for r in rs],
            ]
            ax.bar([r["method"] for r in rs], vals, yerr=err, capsize=3, color="tab:blue")
            ceil = [
                r[metric].get("noise_ceiling")
                for r in rs
                if r[metric].get("noise_ceiling") is not None
            ]
            if ceil:
                ax.axhline(ceil[0], color="k", ls="--", lw=1, label="noise ceiling")
                ax.legend(fontsize=7)
            ax.set_title(b)
            ax.tick_params(axis="x", rotation=60, labelsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        p = plots / f"{metric}_bars.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)
    roc = [r for r in rows if "roc" in r["_curves"]]
    if roc:
        fig, axes = plt.subplots(1, len(benches), figsize=(4.5 * len(benches), 3.5), squeeze=False)
        for ax, b in zip(axes[0], benches, strict=False):
            for r in (r for r in roc if r["benchmark"] == b):
                ax.plot(
                    r["_curves"]["roc"]["fpr"],
                    r["_curves"]["roc"]["tpr"],
                    lw=1,
                    label=f"{r['method']} ({r['auc']['value']:.2f})",
                )
            ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title(f"{b}: mislabel detection")
            ax.legend(fontsize=6)
        fig.tight_layout()
        p = plots / "mislabel_roc.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)
    scatter = [r for r in rows if "loo_scatter" in r["_curves"]]
    if scatter:
        n = len(scatter)
        cols = min(n, 5)
        fig, axes = plt.subplots(
            math.ceil(n / cols), cols, figsize=(3 * cols, 2.8 * math.ceil(n / cols)), squeeze=False
        )
        for ax, r in zip(axes.ravel(), scatter, strict=False):
            c = r["_curves"]["loo_scatter"]
            ax.scatter(c["score"], c["loo_effect"], s=6)
            ax.set_title(f"{r['benchmark']}/{r['method']}", fontsize=8)
            ax.set_xlabel("score", fontsize=7)
            ax.set_ylabel("LOO effect", fontsize=7)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        fig.tight_layout()
        p = plots / "loo_scatter.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)
    return made


def _html(rows: list[dict[str, Any]], images: list[Path], base: Path, fmt: Any) -> str:
    import html

    cells = []
    for r in rows:
        lds_e, loo_e, auc_e = r.get("lds", {}), r.get("loo", {}), r.get("auc", {})
        vals = [
            r["benchmark"],
            r["method"],
            fmt(lds_e.get("value")),
            f"[{fmt(lds_e.get('ci_low'))}, {fmt(lds_e.get('ci_high'))}]",
            fmt(lds_e.get("noise_ceiling")),
            fmt(loo_e.get("value")),
            fmt(auc_e.get("value")),
            fmt(r.get("attribution_seconds"), 1),
        ]
        cells.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in vals) + "</tr>")
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "benchmark",
            "method",
            "LDS",
            "95% CI",
            "noise ceiling",
            "LOO corr",
            "AUC",
            "time (s)",
        )
    )
    imgs = "".join(f'<p><img src="{html.escape(os.path.relpath(p, base))}"></p>' for p in images)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>tdabench report</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style>"
        f"</head><body><h1>tdabench report</h1><table><tr>{head}</tr>{''.join(cells)}</table>{imgs}"
        "</body></html>\n"
    )
