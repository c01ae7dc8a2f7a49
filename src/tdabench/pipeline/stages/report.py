"""``tdabench report``: a thin call into the report renderer (:mod:`tdabench.pipeline.report`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tdabench.pipeline.report import render_report

__all__ = ["report"]


def report(
    spec: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, str]],
    out_md: str,
    out_html: str,
    plots_dir: str,
    summary_csv: str,
    **inputs: Any,
) -> None:
    """Write the report (see :func:`tdabench.pipeline.report.render_report`)."""
    render_report(spec, metrics, out_md, out_html, plots_dir, summary_csv, **inputs)
