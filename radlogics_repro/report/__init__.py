"""Figures and reports (matplotlib, headless). Every figure carries the research-use notice."""

from radlogics_repro.report.figures import training_figure, view_pairs_figure
from radlogics_repro.report.html import render_html_report, screenshot_html, write_html_report
from radlogics_repro.report.overview import render_3d_overview
from radlogics_repro.report.study_figures import (
    ReportError,
    corona_curve_png,
    most_involved_slices,
    slice_overlay_png,
)

__all__ = [
    "ReportError",
    "corona_curve_png",
    "most_involved_slices",
    "render_3d_overview",
    "render_html_report",
    "screenshot_html",
    "slice_overlay_png",
    "training_figure",
    "view_pairs_figure",
    "write_html_report",
]
