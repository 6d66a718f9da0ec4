"""report.html: self-contained, every figure embedded and on disk with real data, robust to missing sections."""

from __future__ import annotations

import base64
import io
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import xarray as xr

from gpu_insar_adjust.errors import InputError
from gpu_insar_adjust.report import FIGURE_NAMES, figure_paths, write_report
from gpu_insar_adjust.report.figures import frame_candidates, frame_rmse, pair_label, selected_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FRAMES = ("014A_04939_131313", "142A_05060_131313", "069D_05002_131313")


class _Page(HTMLParser):
    """Collects <img> sources, <figure data-file>, <a href>, table rows (class + text) and all text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.imgs, self.files, self.hrefs, self.rows, self.text = [], [], [], [], []
        self._row = None
        self._stack = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in ("img", "meta", "br"):
            self._stack.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "figure":
            self.files.append(a.get("data-file"))
        elif tag == "a":
            self.hrefs.append(a.get("href", ""))
        elif tag == "tr":
            self._row = [a.get("class") or "", []]
        elif tag in ("td", "th") and self._row is not None:
            self._row[1].append("")

    def handle_endtag(self, tag):
        assert self._stack and self._stack[-1] == tag, f"unbalanced </{tag}> (open: {self._stack[-3:]})"
        self._stack.pop()
        if tag == "tr" and self._row is not None:
            self.rows.append((self._row[0], "|" + "|".join(self._row[1]) + "|"))
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._row is not None and self._row[1]:
            self._row[1][-1] += data


def _parse(path):
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    assert p._stack == [], f"unclosed tags {p._stack}"
    return p


def _image(png: bytes) -> np.ndarray:
    from matplotlib.image import imread

    assert png[:8] == PNG_SIGNATURE
    return imread(io.BytesIO(png), format="png")


def _n_colours(img: np.ndarray) -> int:
    q = np.round(img[..., :3] * 255).astype(np.int64)
    return int(np.unique(q[..., 0] * 65536 + q[..., 1] * 256 + q[..., 2]).size)


def _grid(values, y, x, name):
    return xr.DataArray(np.asarray(values, np.float32), dims=("y", "x"), coords={"y": y, "x": x}, name=name)


@pytest.fixture(scope="module")
def grids():
    y = np.linspace(39.4, 38.6, 41)  # decreasing, like a GeoTIFF
    x = np.linspace(116.4, 117.4, 51)
    xx, yy = np.meshgrid(x, y)
    r2 = ((xx - 116.9) * np.cos(np.radians(39.0))) ** 2 + (yy - 39.0) ** 2
    vu = -60.0 * np.exp(-r2 / (2 * 0.1**2)) + 4.0 * (xx - 116.4)  # a bowl sinking 60 mm/yr on a gentle uplift
    vu[:3, :5] = np.nan  # no-data corner
    return (_grid(vu, y, x, "vertical_velocity"), _grid(vu * 8.0, y, x, "cumulative"),
            _grid(2.0 * (yy - 39.0), y, x, "east_velocity"))


def _summary() -> dict:
    cand_names = ("poly0", "poly1", "poly2", "poly1+dem", "gp")
    frames = {}
    for k, fid in enumerate(FRAMES):
        cands = {}
        for m, name in enumerate(cand_names):
            c = {"name": name, "cv_rmse": 3.0 - 0.3 * m + 0.2 * k, "cv_se": 0.2 + 0.05 * m}
            if name == "gp" and k == 2:
                c = {"name": name, "skipped": True, "reason": "8 stations < 10 needed"}
            cands[name] = c
        # list form for one frame: the reader accepts both
        frames[fid] = {"candidates": list(cands.values()) if k == 1 else cands,
                       "selected_model": ("poly2", "gp", "poly1+dem")[k],
                       "rmse_before_mm_yr": 6.0 + k, "rmse_after_mm_yr": 2.0 + 0.1 * k, "n_gnss": 12 + k,
                       "flagged_stations": ["BJFS"] if k == 0 else [],
                       "orbit": "ascending" if k < 2 else "descending"}
    return {
        "subsidence_threshold_mm_yr": 20.0,
        "subsidence_area_km2": 1234.5,
        "max_subsidence_rate_mm_yr": 61.2,
        "mean_subsidence_rate_mm_yr": 33.4,
        "frames": frames,
        "network": {"overlap_rms_before_mm_yr": 4.1, "overlap_rms_after_mm_yr": 1.2,
                    "overlap_rms_by_kind": {"asc-desc": {"n_pairs": 3, "rms_before_mm_yr": 6.48,
                                                         "rms_after_mm_yr": 2.53}},
                    "pairs": [{"frames": [FRAMES[0], FRAMES[1]], "kind": "same-track", "rms_before": 4.0,
                               "rms_after": 1.1, "n": 800},
                              {"i": 1, "j": 2, "kind": "cross-track", "rms_before": 4.2, "rms_after": 1.3,
                               "n": 500}]},
        "annual_mean_subsidence_rate_mm_yr": {"2016": 28.0, "2017": 31.5, "2018": 35.2, "2019": 30.1,
                                              "2020": 26.4},
        "hotspots": [{"id": 1, "area_km2": 812.3, "peak_subsidence_rate_mm_yr": 61.2,
                      "mean_subsidence_rate_mm_yr": 35.0,
                      "centroid_lon": 116.9, "centroid_lat": 39.0, "nearest_station": "<b>TJBH</b>",
                      "nearest_station_distance_km": 4.2},
                     {"id": 2, "area_km2": 40.0, "max_subsidence_rate_mm_yr": 25.0, "centroid_lon": 117.2,
                      "centroid_lat": 38.8}],
        "groundwater": {"total_loss_m3": 2.5e9, "total_loss_std_m3": 0.3e9,
                        "periods": [{"start": "2016-01-01", "end": "2018-01-01", "loss_m3": 1.4e9,
                                     "loss_std_m3": 0.2e9, "coverage": 0.97},
                                    {"start": "2018-01-01", "end": "2020-12-31", "loss_m3": 1.1e9,
                                     "loss_std_m3": 0.2e9, "coverage": 0.95}],
                        "assumptions": {"inelastic_fraction": 0.9, "areas": "true cell areas on the ellipsoid"}},
        "validation": {"rmse_mm_yr": 2.34, "bias_mm_yr": -0.41, "mae_mm_yr": 1.9, "r2": 0.93, "n": 14},
        "baseline": {"method": "plane per frame", "validation": {"overall": {"rmse": 7.89, "bias": 3.1, "n": 14}}},
        "provenance": {"version": "0.1.0", "backend": "numpy", "stage_seconds": {"read": 1.2, "adjust": 3.4}},
    }


def _points():
    rng = np.random.default_rng(3)
    obs = rng.uniform(-60, 5, 14)
    return {"station": [f"S{k:02d}" for k in range(14)], "observed": obs,
            "predicted": obs + rng.normal(0, 2.3, 14), "before": obs + 6.0 + rng.normal(0, 4.0, 14)}


def _frame_scatter():
    rng = np.random.default_rng(4)
    out = {}
    for fid in FRAMES:
        g = rng.uniform(-40, 5, 10)
        out[fid] = {"gnss_los": g, "insar_before": g + 5 + rng.normal(0, 3, 10),
                    "insar_after": g + rng.normal(0, 1, 10)}
    return out


@pytest.fixture(scope="module")
def full_report(tmp_path_factory, grids):
    out = tmp_path_factory.mktemp("report")
    pyplot_before = "matplotlib.pyplot" in sys.modules
    path = write_report(out, _summary(), vertical_velocity=grids[0], cumulative=grids[1], east_velocity=grids[2],
                        validation_points=_points(), frame_scatter=_frame_scatter())
    return out, path, pyplot_before


def test_full_report_embeds_every_figure_with_real_data(full_report):
    out, path, pyplot_before = full_report
    assert path == out / "report.html" and path.is_file()
    page = _parse(path)
    on_disk = figure_paths(out)
    assert [p.stem for p in on_disk] == list(FIGURE_NAMES)  # every figure drawn, in page order
    assert sorted(out.joinpath("figures").glob("*.png")) == sorted(on_disk)
    assert page.files == [f"figures/{p.name}" for p in on_disk]  # the page names exactly the files written
    assert len(page.imgs) == len(on_disk)
    for src, p in zip(page.imgs, on_disk):
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png == p.read_bytes()  # the embedded bytes are the file's bytes
        img = _image(png)
        assert img.shape[0] > 150 and img.shape[1] > 300
        assert _n_colours(img) > 20, f"{p.name} looks blank"
    # self-contained: no external request of any kind
    assert all(h.startswith("#") for h in page.hrefs)
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text
    if not pyplot_before:
        assert "matplotlib.pyplot" not in sys.modules  # object-oriented API only: no global figure registry


def test_velocity_map_is_diverging_around_zero(full_report):
    out, _, _ = full_report
    img = _image((out / "figures" / "vertical_velocity.png").read_bytes())[..., :3]
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    red = (r - b > 0.3) & (r - g > 0.2)  # the sinking bowl (negative) in red
    blue = (b - r > 0.3)  # the uplifting east side (positive) in blue
    assert red.sum() > 2000 and blue.sum() > 300
    grey = (np.abs(r - 232 / 255) < 0.01) & (np.abs(g - 232 / 255) < 0.01) & (np.abs(b - 232 / 255) < 0.01)
    assert grey.sum() > 50  # the no-data corner is drawn as no data, not as 0


def test_candidate_table_lists_every_candidate_and_marks_the_chosen(full_report):
    _, path, _ = full_report
    page = _parse(path)
    summary = _summary()
    cand_rows = [(cls, txt) for cls, txt in page.rows if "CV RMSE" not in txt]
    chosen_rows = [txt for cls, txt in cand_rows if cls == "chosen"]
    assert len(chosen_rows) == 3
    for fid, rep in summary["frames"].items():
        names = [c["name"] for c in (rep["candidates"].values() if isinstance(rep["candidates"], dict)
                                     else rep["candidates"])]
        for n in names:
            assert any(f"|{n}|" in txt for _, txt in cand_rows), n
        assert any(f"|{rep['selected_model']}|" in t and "chosen" in t for t in chosen_rows), fid
    # numbers: poly2 of frame 0 scored 3.0 − 0.6 = 2.400 ± 0.300 mm/yr
    assert any("|poly2|2.400 ± 0.300|✓ chosen|" in t for t in chosen_rows)
    skipped = [t for cls, t in page.rows if cls == "skipped"]
    assert len(skipped) == 1 and "8 stations < 10 needed" in skipped[0]  # reason shown (unescaped by the parser)
    text = "".join(page.text)
    assert "BJFS" in text  # flagged station of frame 0
    for fid in FRAMES:
        assert fid in text


def test_headline_tables_and_escaping(full_report):
    _, path, _ = full_report
    raw = path.read_text(encoding="utf-8")
    text = "".join(_parse(path).text)
    assert "1,234.5 km²" in text  # subsidence area
    assert "61.2 mm/yr" in text and "33.4 mm/yr" in text
    assert "2.34 mm/yr" in text and "-0.41 mm/yr" in text  # validation RMSE and bias
    assert "7.89 mm/yr" in text  # baseline RMSE
    assert "2.500 ± 0.300 km³" in text  # groundwater headline in billion m³
    assert "1.4000 ± 0.2000" in text and "2,500,000,000 ± 300,000,000" in text
    assert "4.10 → 1.20 mm/yr" in text  # network overlap RMS
    assert "asc-desc" in text and "6.48" in text and "2.53" in text  # per pair kind
    assert "&lt;b&gt;TJBH&lt;/b&gt;" in raw and "<b>TJBH</b>" not in raw  # escaped, shown literally
    assert "812.30" in text and "116.9000" in text  # hotspot area and centroid
    assert "0.1.0" in text and "numpy" in text and "adjust" in text  # provenance


def test_minimal_summary_renders_with_sections_not_available(tmp_path):
    path = write_report(tmp_path, {"subsidence_area_km2": 12.5})
    page = _parse(path)
    text = "".join(page.text)
    assert "12.5 km²" in text
    assert page.imgs == [] and figure_paths(tmp_path) == []
    assert text.count("not available") >= 8


def test_stale_figures_are_removed_and_malformed_entries_reported(tmp_path, grids):
    write_report(tmp_path, _summary(), vertical_velocity=grids[0])
    assert len(figure_paths(tmp_path)) >= 5
    bad = {"subsidence_area_km2": "n/a", "frames": {"A": {"candidates": 5}, "B": 3},
           "network": {"pairs": [{"i": 0, "j": 1, "rms_before": None, "rms_after": "x"}]},
           "hotspots": [1, 2], "groundwater": {"periods": "nope"}, "validation": {"overall": {"rmse": None}},
           "annual_mean_subsidence_rate_mm_yr": {"2019": None}, "provenance": "v0"}
    path = write_report(tmp_path, bad)
    page = _parse(path)
    assert figure_paths(tmp_path) == [] and page.imgs == []
    text = "".join(page.text)
    assert "no candidates reported" in text and "not available" in text


def test_many_frames_small_multiples(tmp_path):
    rng = np.random.default_rng(0)
    frames = {f"{k:03d}A_00000_000000": {"candidates": {n: {"rmse": float(rng.uniform(1, 5)), "se": 0.3}
                                                        for n in ("poly0", "poly1", "poly2", "gp")},
                                         "chosen": "poly1"} for k in range(40)}
    write_report(tmp_path, {"frames": frames})
    (p,) = figure_paths(tmp_path)
    img = _image(p.read_bytes())
    assert p.stem == "candidate_scores"
    assert img.shape[1] > 1000 and img.shape[0] < 4000  # 4 panels a row, 10 rows: readable, not absurd
    assert _n_colours(img) > 20


def test_reads_the_pipeline_schema():
    """Keys written by adjust.frame / network / analysis.validation are understood as well as the aliases."""
    rep = {"candidates": {"poly1": {"name": "poly1", "rmse": 2.5, "se": 0.25, "skipped": None},
                          "gp": {"name": "gp", "rmse": None, "se": None, "skipped": "3 stations < 8 needed"}},
           "chosen": "poly1", "training": {"n": 9, "rmse_before": 5.5, "rmse_after": 1.5}}
    c = frame_candidates(rep)
    assert [x["name"] for x in c] == ["poly1", "gp"]
    assert c[0]["cv_rmse"] == 2.5 and c[0]["cv_se"] == 0.25 and c[0]["skipped"] is None
    assert np.isnan(c[1]["cv_rmse"]) and c[1]["skipped"] == "3 stations < 8 needed"
    assert selected_model(rep) == "poly1" and frame_rmse(rep) == (5.5, 1.5)
    assert pair_label({"i": 1, "j": 2, "kind": "cross"}, ["a", "b", "c"]) == "b – c (cross)"
    assert pair_label({"frames": ["x", "y"]}) == "x – y"


def test_validation_scatter_from_summary(tmp_path):
    scatter = [{"station": f"S{k}", "gnss": -5.0 * k, "insar": -5.0 * k + (1 if k % 2 else -1)} for k in range(8)]
    base = [{"station": f"S{k}", "gnss": -5.0 * k, "insar": -5.0 * k + 4.0} for k in range(8)]
    s = {"validation": {"overall": {"rmse": 1.0, "bias": 0.0, "n": 8}, "scatter": scatter},
         "baseline": {"validation": {"overall": {"rmse": 4.0, "bias": 4.0, "n": 8}, "scatter": base}}}
    path = write_report(tmp_path, s)
    assert [p.stem for p in figure_paths(tmp_path)] == ["validation_scatter"]
    text = "".join(_parse(path).text)
    assert "1.00 mm/yr" in text and "4.00 mm/yr" in text  # adjusted and baseline RMSE


def test_bad_arguments_raise_input_errors(tmp_path, grids):
    with pytest.raises(InputError, match="summary"):
        write_report(tmp_path, [1, 2])
    with pytest.raises(InputError) as e:
        write_report(tmp_path, {}, vertical_velocity=grids[0].rename({"y": "lat"}))
    assert e.value.field == "vertical_velocity" and e.value.fix
    with pytest.raises(InputError) as e:
        write_report(tmp_path, {}, validation_points={"observed": [1.0, 2.0], "predicted": [1.0]})
    assert e.value.field == "validation_points.predicted"
    with pytest.raises(InputError) as e:
        write_report(tmp_path, {}, frame_scatter={"F": {"insar_after": [1.0]}})
    assert e.value.field == "frame_scatter.F"


def test_figures_are_released_after_saving(tmp_path, grids):
    import gc

    from matplotlib.figure import Figure

    def figures_alive() -> int:
        # type(), not isinstance(): isinstance asks a weak proxy for its __class__, which raises ReferenceError
        # when the proxy's object is gone (other libraries leave such proxies among the collector's objects)
        return sum(issubclass(type(o), Figure) for o in gc.get_objects())

    gc.collect()
    alive_before = figures_alive()
    write_report(tmp_path, _summary(), vertical_velocity=grids[0], frame_scatter=_frame_scatter())
    gc.collect()
    assert figures_alive() == alive_before  # no figure kept alive
