"""Per-frame machine-learning adjustment of InSAR LOS velocities to GNSS (Mi et al. 2026).

In each frame, InSAR − GNSS in LOS is a long-wavelength error surface whose shape varies between frames
(orbit ramps, ionosphere, stratified troposphere, plate motion, reference offsets). Several candidate models are
fitted to the differences at the GNSS stations, the one that predicts held-out stations best under spatial
cross-validation is chosen per frame (simplest within one standard error), and it is removed from every pixel.

* :mod:`.residuals` — InSAR − GNSS at each station (robust window median).
* :mod:`.models` — the candidate surfaces (scikit-learn estimators) and their registry.
* :mod:`.selection` — spatial block K-fold / leave-one-out CV, the one-SE choice, outlier screening.
* :mod:`.frame` — :func:`adjust_frame` and :class:`AdjustConfig`.
"""

from __future__ import annotations

from .frame import AdjustConfig, FrameAdjustment, adjust_frame
from .models import (DEFAULT_CANDIDATES, GaussianProcessSurface, LowPassSurface, PolynomialSurface,
                     ThinPlateSplineSurface, TreeEnsembleSurface, candidate_complexity, candidate_names,
                     make_candidate)
from .residuals import local_xy_km, merge_colocated, station_residuals
from .selection import BlockKFold, cross_validate_candidates, flag_outliers, make_splitter, select_model

__all__ = ["AdjustConfig", "FrameAdjustment", "adjust_frame", "DEFAULT_CANDIDATES", "PolynomialSurface",
           "GaussianProcessSurface", "ThinPlateSplineSurface", "LowPassSurface", "TreeEnsembleSurface",
           "make_candidate", "candidate_names", "candidate_complexity", "local_xy_km", "station_residuals",
           "merge_colocated", "BlockKFold", "make_splitter", "cross_validate_candidates", "select_model",
           "flag_outliers"]
