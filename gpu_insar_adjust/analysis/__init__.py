"""Analysis of the adjusted products: subsidence statistics, groundwater storage loss, validation."""

from .groundwater import groundwater_loss
from .subsidence import annual_subsidence, find_hotspots, subsidence_rate, subsidence_summary
from .validation import (error_statistics, sample_grid, validate_against_gnss, validate_against_truth,
                         validate_timeseries_against_gnss)

__all__ = ["subsidence_summary", "annual_subsidence", "find_hotspots", "subsidence_rate", "groundwater_loss",
           "validate_against_gnss", "validate_against_truth", "validate_timeseries_against_gnss", "sample_grid",
           "error_statistics"]
