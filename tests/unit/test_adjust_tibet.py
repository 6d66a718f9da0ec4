"""Real residual set: Sentinel-1 track 012 ascending, western Tibet, 48 GNSS sites.

Source: repository igps-ftk/iGPS (example/insar/proc_gmtsar/012-a-...), GNSS from Wang & Shen (2020) JGR 125
e2019JB018774. Columns: lon, lat, InSAR LOS before any GNSS correction (GMTSAR SBAS), GNSS LOS (mm/yr).
RMS(InSAR − GNSS) 9.1 mm/yr before; GMTSAR's surface-and-filter correction reached 1.9 mm/yr in-sample.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import LeaveOneOut

from gpu_insar_adjust.adjust import local_xy_km, make_candidate, selection

pytestmark = pytest.mark.real_data

CANDIDATES = ["poly0", "poly1", "poly2", "poly3", "lowpass", "tps", "gp", "gbr", "rf"]


@pytest.fixture(scope="module")
def tibet(real_data):
    path = real_data / "tibet_t012a_insar_vs_gnss_los.txt"
    if not path.is_file():
        pytest.skip(f"{path.name} not in the real-data folder")
    lon, lat, insar, gnss = np.loadtxt(path, unpack=True)
    x, y = local_xy_km(lon, lat, float((lon.min() + lon.max()) / 2), float((lat.min() + lat.max()) / 2))
    return pd.DataFrame({"x_km": x, "y_km": y}), insar - gnss


@pytest.fixture(scope="module")
def loo_scores(tibet):
    X, r = tibet
    return selection.cross_validate_candidates(X, r, None, candidates=CANDIDATES, splitter=LeaveOneOut())


def test_tibet_table_as_documented(tibet):
    X, r = tibet
    assert len(r) == 48
    assert float(np.sqrt(np.mean(r ** 2))) == pytest.approx(9.1, abs=0.05)
    assert float(np.ptp(X.y_km)) > 1000.0  # a ~1060 km long track


def test_tibet_leave_one_station_out_figures(loo_scores):
    s = {k: v for k, v in loo_scores.items()}
    print(json.dumps({k: v.to_dict() for k, v in s.items()}, indent=1))
    assert all(v.skipped is None for v in s.values())
    # Measured LOO RMSE ± SE (mm/yr): poly0 3.32±0.23, poly1 1.67±0.15, poly2 1.17±0.10, poly3 1.04±0.09,
    # lowpass 1.24±0.16, tps 1.14±0.10, gp 1.11±0.11, gbr 1.06±0.10, rf 1.01±0.09.
    assert 3.0 < s["poly0"].rmse < 3.6
    assert 1.5 < s["poly1"].rmse < 1.85  # "a plane leaves about 1.7 mm/yr"
    for name in ("poly2", "poly3", "tps", "gp"):
        assert 0.95 < s[name].rmse < 1.3, name  # "good higher-order or GP surfaces about 1.1-1.2"
    assert s["lowpass"].rmse < 1.4
    for v in s.values():
        assert 0.05 < v.se < 0.3


def test_tibet_selection_beats_plane_within_one_se_of_best(tibet, loo_scores):
    X, r = tibet
    chosen, why = selection.select_model(loo_scores)
    best = min((v for v in loo_scores.values()), key=lambda v: v.rmse)
    c = loo_scores[chosen]
    # measured: poly3 chosen (1.04 mm/yr), best rf 1.01 ± 0.09, plane 1.67
    assert c.rmse <= best.rmse + best.se
    assert c.rmse < 0.7 * loo_scores["poly1"].rmse
    assert chosen == "poly3", why
    # in-sample, the chosen surface leaves 0.93 mm/yr (GMTSAR surface-and-filter: 1.9 mm/yr in-sample)
    m = make_candidate(chosen).fit(X, r)
    in_sample = float(np.sqrt(np.mean((r - m.predict(X)) ** 2)))
    assert in_sample < 1.0


def test_tibet_has_no_outlier_station(tibet):
    X, r = tibet
    keep, flagged = selection.flag_outliers(X, r)
    assert flagged == [] and keep.all()
