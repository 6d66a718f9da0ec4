"""Per-frame adjustment on the embedded North China Plain scenario (18 frames, planted error kinds known)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CANDIDATES = ["poly0", "poly1", "poly2", "poly3", "poly1+dem", "poly2+dem", "lowpass", "tps", "gp"]

# Which chosen models count as matching each planted error kind.
FAMILY = {
    "ramp": {"poly0", "poly1"},
    "quadratic": {"poly2", "poly2+dem", "poly3", "tps", "gp", "lowpass"},
    "cubic": {"poly2", "poly3", "poly2+dem", "tps", "gp", "lowpass"},
    "dem": {"poly1+dem", "poly2+dem", "poly1+dem+inc"},
    "iono": {"gp", "tps", "lowpass"},
}


@pytest.fixture(scope="module")
def adjusted(tmp_path_factory):
    synthetic = pytest.importorskip("gpu_insar_adjust.synthetic")
    from gpu_insar_adjust.adjust import AdjustConfig, adjust_frame
    from gpu_insar_adjust.adjust.residuals import station_residuals
    from gpu_insar_adjust.geodesy.gnss_los import gnss_in_frame
    from gpu_insar_adjust.io.frames import open_frame
    from gpu_insar_adjust.io.gnss import read_gnss

    paths = synthetic.make_scenario(tmp_path_factory.mktemp("ncp"), seed=0, resolution=0.02)
    truth = json.loads(paths.scenario_json.read_text())["frames"]
    train, hold = read_gnss(paths.gnss_csv), read_gnss(paths.holdout_csv)
    cfg = AdjustConfig(candidates=CANDIDATES, loo_below=20)  # block K-fold from 20 stations: keeps this < 60 s
    rows = []
    for fdir in paths.frame_dirs:
        frame = open_frame(fdir)
        out = adjust_frame(frame, train, cfg, holdout=hold)
        # the floor: held-out RMSE if the planted error itself were removed (station noise only)
        h, _ = station_residuals(frame, gnss_in_frame(hold, frame))
        planted = synthetic.planted_error(truth[fdir.name], h.lon.to_numpy(), h.lat.to_numpy(),
                                          h.height_m.to_numpy())
        oracle = float(np.sqrt(np.mean((h.residual.to_numpy() - planted) ** 2)))
        rows.append({"frame": fdir.name, "kind": truth[fdir.name]["error_kind"], "chosen": out.report["chosen"],
                     "before": out.report["holdout"]["rmse_before"], "after": out.report["holdout"]["rmse_after"],
                     "oracle": oracle, "report": out.report})
    return rows


def test_chosen_family_matches_planted_kind(adjusted):
    match = [r["chosen"] in FAMILY[r["kind"]] for r in adjusted]
    ramps = [r for r in adjusted if r["kind"] == "ramp"]
    print({r["frame"]: (r["kind"], r["chosen"], r["after"], round(r["oracle"], 2)) for r in adjusted})
    # Ramp frames: the lowest CV score picks a plane in one of the four (seed 0, 0.02°); the other three get a
    # smooth surface (lowpass, lowpass, gp) that fits the plane plus some station noise, 1.06-2.35 mm/yr held
    # out, at most 1.3 × the planted-error floor. The one-SE rule kept planes in three of them, at 1.06-2.40.
    assert sum(r["chosen"] in FAMILY["ramp"] for r in ramps) >= 1
    assert all(r["after"] < 1.5 * r["oracle"] for r in ramps), [(r["frame"], r["chosen"], r["after"]) for r in ramps]
    # target: the chosen family matches the planted kind in most frames. Measured 12 of 18 (seed 1: 12, seed 2:
    # 13); the paired one-SE rule gave 11 (13, 9).
    assert sum(match) > len(adjusted) / 2
    json.dumps([r["report"] for r in adjusted])


def test_held_out_rmse_after_adjustment(adjusted):
    before = np.median([r["before"] for r in adjusted])
    after = np.median([r["after"] for r in adjusted])
    oracle = np.median([r["oracle"] for r in adjusted])
    print(f"median held-out LOS RMSE: before {before:.2f}, after {after:.2f}, planted-error floor {oracle:.2f}")
    # measured (seed 0, 0.02°): before 22.6 mm/yr (reference offsets included), after 1.94 mm/yr with the lowest
    # CV score (2.17 with the paired one-SE rule, 2.51 with the unpaired one); removing the exact planted error
    # leaves 1.49 mm/yr at held-out stations. Seeds 1 and 2 (0.02°): 2.88 and 1.72 (one-SE rule: 2.63, 2.09).
    assert before > 15.0
    assert after <= 2.0
    assert after < 1.4 * oracle
