"""``tdabench report``: the report renderer itself (:func:`tdabench.pipeline.report.render_report`),
under the stage's name; the stage adds nothing to it."""

from __future__ import annotations

from tdabench.pipeline.report import render_report as report

__all__ = ["report"]
