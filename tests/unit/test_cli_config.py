"""The gia command line and the configuration."""

import subprocess
import sys
import time

import pytest

from gpu_insar_adjust import config, errors
from gpu_insar_adjust.cli import main


def test_version_is_fast_and_light():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c",
                          "import sys; from gpu_insar_adjust.cli import main; rc = main(['--version']); "
                          "print(sorted(m for m in ('numpy', 'typer', 'xarray') if m in sys.modules)); "
                          "sys.exit(rc)"],
                         capture_output=True, text=True, check=True)
    assert "gia (gpu_insar_adjust) " in out.stdout
    assert out.stdout.strip().endswith("[]"), "gia --version imported heavy modules"
    assert time.perf_counter() - t0 < 10


def test_help_and_show_versions(capsys):
    assert main(["--help"]) == 0
    assert "synth" in capsys.readouterr().out
    assert main(["show-versions"]) == 0
    out = capsys.readouterr().out
    for key in ("gpu_insar_adjust", "numpy", "GDAL", "PROJ", "gpu"):
        assert key in out


def test_default_config_round_trips(tmp_path, capsys):
    assert main(["config", "--default"]) == 0
    text = capsys.readouterr().out
    assert "# Array backend" in text
    path = tmp_path / "gia.toml"
    path.write_text(text)
    assert config.load_config(path) == config.GiaConfig()


def test_config_errors_name_field_and_fix(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[analysis]\nsubsidence_treshold_mm_yr = 20\n")
    with pytest.raises(errors.ConfigError) as info:
        config.load_config(p)
    assert "analysis.subsidence_treshold_mm_yr" in str(info.value) and str(p) in str(info.value)
    p.write_text("[analysis]\nsubsidence_threshold_mm_yr = -20\n")
    with pytest.raises(errors.ConfigError, match="greater than 0"):
        config.load_config(p)
    p.write_text("backend = [\n")
    with pytest.raises(errors.ConfigError, match="not valid TOML"):
        config.load_config(p)
    with pytest.raises(errors.ConfigError, match="not found"):
        config.load_config(tmp_path / "missing.toml")


def test_adjust_section_reaches_the_per_frame_adjustment(tmp_path):
    p = tmp_path / "adj.toml"
    p.write_text('[adjust]\ncandidates = ["poly0", "poly1", "gp"]\none_se_rule = true\n'
                 'min_stations = {"gp" = 12}\n')
    cfg = config.load_config(p)
    assert cfg.adjust.candidates == ["poly0", "poly1", "gp"] and cfg.adjust.one_se_rule
    assert cfg.adjust.min_stations == {"gp": 12}
    # what `gia config` writes reads back to the same configuration, inline table included
    assert config.load_config(None, config._toml_loads(config.config_to_toml(cfg))) == cfg
    p.write_text('[adjust]\ncandidates = ["poly1", "kriging"]\n')
    with pytest.raises(errors.ConfigError) as info:
        config.load_config(p)
    assert "adjust.candidates" in str(info.value) and "kriging" in str(info.value)
    # a misspelt candidate in min_stations, or a minimum below one station, is refused, not ignored
    for table, word in (('{"poly1+DEM" = 8}', "poly1+DEM"), ('{"gp" = 0}', "at least 1")):
        p.write_text(f"[adjust]\nmin_stations = {table}\n")
        with pytest.raises(errors.ConfigError) as info:
            config.load_config(p)
        assert "adjust.min_stations" in str(info.value) and word in str(info.value)


def test_frame_cache_key_follows_inputs_config_and_code(tmp_path, monkeypatch):
    """A resumed run reuses a frame's adjustment only if its files, the other inputs, the adjust settings and the
    code that computed it are all the same."""
    from gpu_insar_adjust import pipeline, versions

    folder = tmp_path / "frames" / "014A_04939_131313"
    sums = {str(folder / "vel.geo.tif"): "aa", str(tmp_path / "gnss.csv"): "bb",
            str(tmp_path / "frames" / "087A_04904_121313" / "vel.geo.tif"): "cc"}
    cfg = config.GiaConfig()
    key = pipeline._frame_key(folder, sums, cfg)
    assert key == pipeline._frame_key(folder, dict(sums), config.GiaConfig())
    other_frame = {**sums, str(tmp_path / "frames" / "087A_04904_121313" / "vel.geo.tif"): "dd"}
    assert pipeline._frame_key(folder, other_frame, cfg) == key  # another frame's file is not this frame's input
    assert pipeline._frame_key(folder, {**sums, str(folder / "vel.geo.tif"): "ee"}, cfg) != key
    assert pipeline._frame_key(folder, {**sums, str(tmp_path / "gnss.csv"): "ff"}, cfg) != key
    assert pipeline._frame_key(folder, sums, cfg.model_copy(update={"adjust": cfg.adjust.model_copy(
        update={"one_se_rule": True})})) != key
    # the same files in other parts: GNSS and held-out tables swapped, east and north grids swapped, grids read
    # in another reference frame
    roles = pipeline._input_roles("g.csv", "h.csv", ("e.tif", "n.tif"), "EURA-fixed")
    with_roles = pipeline._frame_key(folder, sums, cfg, roles)
    assert with_roles == pipeline._frame_key(folder, sums, cfg, dict(roles))
    for other in (pipeline._input_roles("h.csv", "g.csv", ("e.tif", "n.tif"), "EURA-fixed"),
                  pipeline._input_roles("g.csv", "h.csv", ("n.tif", "e.tif"), "EURA-fixed"),
                  pipeline._input_roles("g.csv", "h.csv", ("e.tif", "n.tif"), "ITRF2014")):
        assert pipeline._frame_key(folder, sums, cfg, other) != with_roles
    # without grids their frame plays no part
    assert pipeline._input_roles("g.csv", None, None, "ITRF2014") == pipeline._input_roles("g.csv", None, None,
                                                                                           "EURA-fixed")
    assert len(versions.code_fingerprint()) == 16
    monkeypatch.setattr(versions, "code_fingerprint", lambda: "0" * 16)  # the sources were edited
    assert pipeline._frame_key(folder, sums, cfg) != key


def test_overrides():
    cfg = config.load_config(None, {"backend": "numpy", "analysis.subsidence_threshold_mm_yr": 10.0})
    assert cfg.backend == "numpy" and cfg.analysis.subsidence_threshold_mm_yr == 10.0


@pytest.mark.parametrize("overrides,grids_frame,plate", [
    ({}, None, "EURA"),                                                   # the default
    ({"gnss.reference_frame": "NOAM-fixed"}, None, "NOAM"),               # the GNSS frame names its plate
    ({"gnss.reference_frame": "pcfc_fixed"}, None, "PCFC"),
    ({"gnss.reference_frame": "IGS20"}, None, "EURA"),                    # a global frame names none
    ({"gnss.reference_frame": "IGS20"}, "NOAM-fixed", "NOAM"),            # ... plate-fixed grids do
    ({"gnss.reference_frame": "IGS20", "gnss.plate": "pcfc"}, "NOAM-fixed", "PCFC"),  # given: kept
])
def test_plate_follows_a_plate_fixed_frame_unless_given(overrides, grids_frame, plate, tmp_path):
    cfg = config.load_config(None, overrides)
    assert cfg.gnss.plate_for(grids_frame) == plate
    # what `gia config` writes leaves the plate unset, so that a frame given later still names it
    written = tmp_path / "gia.toml"
    written.write_text(config.config_to_toml(config.GiaConfig()))
    assert config.load_config(written, {"gnss.reference_frame": "NOAM-fixed"}).gnss.plate_for() == "NOAM"


def test_plate_disagreeing_with_a_plate_fixed_frame_is_a_config_error():
    with pytest.raises(errors.ConfigError) as info:
        config.load_config(None, {"gnss.reference_frame": "NOAM-fixed", "gnss.plate": "EURA"})
    assert "gnss" in str(info.value) and "plate = 'NOAM'" in str(info.value)


def test_user_errors_exit_2_without_traceback(capsys):
    rc = main(["config", "--check", "/nonexistent/gia.toml"])
    err = capsys.readouterr().err
    assert rc == 2 and "ConfigError" in err and "Traceback" not in err


def test_unknown_command_exits_2(capsys):
    assert main(["no-such-command"]) == 2


def test_debug_prints_the_traceback_of_a_user_error(capsys):
    rc = main(["--debug", "config", "--check", "/nonexistent/gia.toml"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and "ConfigError" in err
    # the flag does not stick to later invocations
    assert main(["config", "--check", "/nonexistent/gia.toml"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_internal_error_exits_1_with_traceback_and_versions(monkeypatch, capsys, tmp_path):
    from gpu_insar_adjust import cli

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(cli, "_check", broken)
    rc = main(["check", "--frames", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" in err and "RuntimeError: simulated bug" in err
    assert "please report it" in err and "numpy" in err  # the versions table follows


def test_run_check_reports_a_broken_frame_and_exits_2(tmp_path, capsys):
    frames = tmp_path / "frames"
    (frames / "001A_BROKEN").mkdir(parents=True)
    (frames / "001A_BROKEN" / "vel.geo.tif").write_bytes(b"this is not a GeoTIFF")
    gnss = tmp_path / "gnss.csv"
    gnss.write_text("station,lon,lat,ve,vn,vu,se,sn,su\nA001,116.0,38.0,30.0,-8.0,-5.0,0.4,0.4,1.2\n")
    rc = main(["run", "--check", "--frames", str(frames), "--gnss", str(gnss), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert rc == 2, text
    assert "001A_BROKEN" in text and "Traceback" not in text
    assert not (tmp_path / "out" / "summary.json").exists()


def test_run_cluster_option_reaches_the_configuration(tmp_path, capsys):
    """``gia run --cluster cuda`` on the CPU backend is refused before anything is read or written (exit 2, the
    setting and the fix named); an unknown kind is a configuration error."""
    for extra in ([], ["--check"]):  # the check of the inputs refuses it as the run does
        rc = main(["run", "--frames", str(tmp_path / "frames"), "--gnss", str(tmp_path / "gnss.csv"), "--out",
                   str(tmp_path / "out"), "--backend", "numpy", "--cluster", "cuda", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "parallel.cluster" in err and "--backend cupy" in err
        assert not (tmp_path / "out").exists()
    with pytest.raises(errors.ConfigError, match="cluster"):
        config.load_config(None, {"parallel.cluster": "gpus"})


def test_run_check_needs_a_reference_and_reads_the_grids(tmp_path, capsys, monkeypatch):
    """``gia run --check`` checks what the run needs: GNSS or horizontal grids (neither is an error, as the run
    would refuse), and the grids themselves, read as the run reads them."""
    monkeypatch.setenv("COLUMNS", "400")  # the table's cells on one line each
    frames = tmp_path / "frames"
    frames.mkdir()
    base = ["run", "--check", "--frames", str(frames), "--out", str(tmp_path / "out")]
    assert main(base) == 2
    text = capsys.readouterr().out
    assert "No GNSS input" in text and "--horizontal-grids" in text
    east = tmp_path / "ve.tif"
    assert main([*base, "--horizontal-grids", str(east), str(tmp_path / "vn.tif")]) == 2
    text = capsys.readouterr().out
    assert "Horizontal velocity grid not found" in text and "No GNSS input" not in text
    assert main([*base, "--horizontal-grids", str(east), str(tmp_path / "vn.tif"), "--grids-frame",
                 "NA-fixed"]) == 2
    text = capsys.readouterr().out
    assert "Unknown reference frame 'NA-fixed' of the horizontal grids" in text and "--grids-frame" in text
