"""The human-readable report: ``report.html`` (self-contained) and its figures as PNG files.

matplotlib is imported only when a figure is drawn (Agg canvas, no pyplot), so importing this package is cheap.
"""

from __future__ import annotations

from .figures import (
    annual_rate_figure,
    candidate_scores_figure,
    groundwater_figure,
    map_figure,
    overlap_misfit_figure,
    scatter_figure,
)
from .html import FIGURE_NAMES, figure_paths, write_report

__all__ = ["FIGURE_NAMES", "annual_rate_figure", "candidate_scores_figure", "figure_paths", "groundwater_figure",
           "map_figure", "overlap_misfit_figure", "scatter_figure", "write_report"]
