"""The ``gia`` command: a thin shell over :mod:`gpu_insar_adjust.pipeline` and friends.

Exit codes: 0 success; 2 a problem with the user's input or request (a :class:`GiaError`, printed without a
traceback unless ``--debug``); 1 an unexpected internal error (traceback and versions printed, please report).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

_DEBUG = False


def _fast_version(argv: list[str]) -> bool:
    """``gia --version`` answers without importing typer, numpy or anything heavy."""
    if argv in (["--version"], ["-V"]):
        from ._version import __version__

        print(f"gia (gpu_insar_adjust) {__version__}")
        return True
    return False


def _build_app():
    import typer

    app = typer.Typer(name="gia", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="GNSS-consistent wide-area InSAR adjustment, mosaicking and subsidence analysis "
                           "(CPU or GPU).")

    @app.callback()
    def main_options(
        version: bool = typer.Option(False, "--version", "-V", help="Print the version and exit."),
        debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for every error."),
    ) -> None:
        global _DEBUG
        _DEBUG = debug
        if version:
            from ._version import __version__

            typer.echo(f"gia (gpu_insar_adjust) {__version__}")
            raise typer.Exit(0)

    @app.command("show-versions")
    def show_versions_cmd() -> None:
        """Print package, dependency, CUDA and GPU versions (paste this into bug reports)."""
        from .versions import show_versions

        typer.echo(show_versions())

    @app.command("config")
    def config_cmd(
        default: bool = typer.Option(False, "--default", help="Print the default configuration as commented "
                                                                "TOML."),
        check: Optional[Path] = typer.Option(None, "--check", help="Validate a configuration file and print it "
                                                                     "with all defaults filled in."),
    ) -> None:
        """Print the default configuration, or check a configuration file."""
        from . import config as cfgmod

        if check is not None:
            typer.echo(cfgmod.config_to_toml(cfgmod.load_config(check)))
        elif default:
            typer.echo(cfgmod.default_config_toml(), nl=False)
        else:
            raise typer.BadParameter("give --default or --check FILE")

    @app.command("synth")
    def synth_cmd(
        out: Path = typer.Argument(..., help="Folder to write the scenario into (created)."),
        seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same scenario."),
        resolution: float = typer.Option(0.02, "--resolution", help="Pixel spacing in degrees (0.001 = ~100 m, "
                                                                     "the full-size benchmark case)."),
        timeseries: bool = typer.Option(False, "--timeseries", help="Also write displacement time series "
                                                                    "(LiCSBAS cum.h5) per frame."),
        epoch_days: int = typer.Option(12, "--epoch-days", help="Days between epochs of the time series."),
        n_stations: int = typer.Option(150, "--n-stations", help="Number of GNSS stations."),
        holdout_fraction: float = typer.Option(0.3, "--holdout-fraction", help="Share of stations written to the "
                                                                               "held-out file."),
    ) -> None:
        """Write the embedded North China Plain scenario (frames, GNSS, held-out GNSS, truth)."""
        from .synthetic import make_scenario

        _logging()
        p = make_scenario(out, seed=seed, resolution=resolution, timeseries=timeseries, epoch_days=epoch_days,
                          n_stations=n_stations, holdout_fraction=holdout_fraction)
        typer.echo(f"wrote {len(p.frame_dirs)} frames, {p.gnss_csv.name}, {p.holdout_csv.name} and truth/ "
                   f"into {p.out_dir}")

    @app.command("run")
    def run_cmd(
        frames: Path = typer.Option(..., "--frames", help="Folder with one sub-folder per frame (LiCSAR/LiCSBAS "
                                                          "or MintPy layout)."),
        out: Path = typer.Option(..., "--out", help="Output folder."),
        gnss: Optional[Path] = typer.Option(None, "--gnss", help="GNSS velocities: CSV station,lon,lat,ve,vn,vu,"
                                                                 "se,sn,su (mm/yr) or a MIDAS file."),
        holdout: Optional[Path] = typer.Option(None, "--holdout", help="Independent GNSS stations, used only for "
                                                                       "validation."),
        gnss_frame: Optional[str] = typer.Option(None, "--gnss-frame", help="Reference frame of the GNSS file "
                                                                            "(ITRF2014, IGS20, EURA-fixed, ...)."),
        plate: Optional[str] = typer.Option(None, "--plate", help="Plate for plate-fixed conversions (EURA, "
                                                                  "NOAM, ...; default: the plate of a "
                                                                  "'<PLATE>-fixed' --gnss-frame, else EURA)."),
        horizontal_grids: Optional[tuple[Path, Path]] = typer.Option(
            None, "--horizontal-grids", help="East and north horizontal velocity grids (mm/yr) to use as the "
                                             "horizontal field; with no --gnss, frames are referenced to them "
                                             "(horizontal-only mode)."),
        grids_frame: str = typer.Option("EURA-fixed", "--grids-frame", help="Reference frame of the grids."),
        config: Optional[Path] = typer.Option(None, "--config", help="TOML configuration (gia config --default)."),
        backend: Optional[str] = typer.Option(None, "--backend", help="auto | numpy | cupy (overrides config)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace another run's products in --out."),
        check: bool = typer.Option(False, "--check", help="Only check every input (no compute) and list all "
                                                          "problems; exit 2 if any is an error."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Adjust frames on a local Dask cluster with "
                                                                      "this many workers (0: in this process; "
                                                                      "default: one per core on 4+ cores when 4+ "
                                                                      "frames are to be adjusted)."),
        scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Adjust frames on an existing Dask "
                                                                          "scheduler (tcp://HOST:PORT)."),
        cluster: Optional[str] = typer.Option(None, "--cluster", help="Local cluster: cpu (worker processes, "
                                                                      "sharing the GPU on the GPU backend) | cuda "
                                                                      "(dask-cuda, one worker per GPU) | auto."),
    ) -> None:
        """Adjust every frame to GNSS, merge them by network least squares, mosaic, and analyse."""
        from .config import load_config
        from .pipeline import run

        cfg = load_config(config, {"backend": backend, "gnss.reference_frame": gnss_frame, "gnss.plate": plate,
                                   "parallel.workers": workers, "parallel.scheduler": scheduler,
                                   "parallel.cluster": cluster})
        _logging(cfg.log_level)
        if check:
            from . import backend as _backend
            from .pipeline import _check_cluster

            with _backend.use_backend(cfg.backend) as backend_name:  # settings the run would refuse, first
                _check_cluster(cfg.parallel, backend_name)
            raise typer.Exit(_check(frames, gnss, holdout, cfg.gnss.reference_frame, as_json=False,
                                    horizontal_grids=tuple(horizontal_grids) if horizontal_grids else None,
                                    horizontal_grids_frame=grids_frame, require_reference=True))
        res = run(frames, gnss, out, holdout=holdout, config=cfg,
                  horizontal_grids=tuple(horizontal_grids) if horizontal_grids else None,
                  horizontal_grids_frame=grids_frame, overwrite=overwrite)
        _print_headline(res.summary)

    @app.command("check")
    def check_cmd(
        frames: Path = typer.Option(..., "--frames", help="Folder with one sub-folder per frame."),
        gnss: Optional[Path] = typer.Option(None, "--gnss", help="GNSS velocity file."),
        holdout: Optional[Path] = typer.Option(None, "--holdout", help="Held-out GNSS file."),
        gnss_frame: str = typer.Option("ITRF2014", "--gnss-frame", help="Reference frame of the GNSS file."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ) -> None:
        """Check every input before any compute and list all problems at once (same as `gia run --check`)."""
        raise typer.Exit(_check(frames, gnss, holdout, gnss_frame, as_json=as_json))

    @app.command("demo")
    def demo_cmd(
        seed: int = typer.Option(0, "--seed", help="Scenario seed."),
        resolution: float = typer.Option(0.02, "--resolution", help="Scenario pixel spacing in degrees."),
        keep: Optional[Path] = typer.Option(None, "--keep", help="Keep the scenario and products in this folder "
                                                                 "(default: a temporary folder, removed)."),
        timeseries: bool = typer.Option(False, "--timeseries", help="Include displacement time series: annual "
                                                                    "rates, cumulative subsidence, groundwater."),
        epoch_days: int = typer.Option(36, "--epoch-days", help="Days between epochs of the demo time series."),
    ) -> None:
        """Synthesise the embedded scenario, run the whole pipeline on it and validate against its truth."""
        import shutil
        import tempfile

        from .pipeline import run
        from .synthetic import make_scenario
        from .validate import validate_run

        _logging()
        root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="gia-demo-"))
        try:
            p = make_scenario(root / "scenario", seed=seed, resolution=resolution, timeseries=timeseries,
                              epoch_days=epoch_days)
            res = run(p.frames_dir, p.gnss_csv, root / "out", holdout=p.holdout_csv, overwrite=True)
            val = validate_run(root / "out", truth=p.truth_dir, holdout=p.holdout_csv)
            _print_headline(res.summary, val)
        finally:
            if not keep:
                shutil.rmtree(root, ignore_errors=True)

    @app.command("validate")
    def validate_cmd(
        out: Path = typer.Argument(..., help="A `gia run` output folder."),
        truth: Optional[Path] = typer.Option(None, "--truth", help="Truth folder (vertical_velocity.tif) of a "
                                                                   "synthetic scenario."),
        holdout: Optional[Path] = typer.Option(None, "--holdout", help="Held-out GNSS CSV."),
        holdout_series: Optional[Path] = typer.Option(None, "--holdout-series",
                                                      help="Folder of held-out daily GNSS series (.tenv3/.neu) "
                                                           "to compare with the run's displacement cube."),
    ) -> None:
        """Compare a run's vertical velocity with held-out GNSS and/or a truth grid (writes validation.json)."""
        from .validate import validate_run

        _logging()
        val = validate_run(out, truth=truth, holdout=holdout, holdout_series=holdout_series)
        typer.echo(json.dumps(val, indent=2, default=str))

    @app.command("bench")
    def bench_cmd(
        size: str = typer.Option("small", "--size", help="small (seconds) or full (the issue sizes)."),
        case: list[str] = typer.Option(["B1", "B2", "B3"], "--case",
                                       help="Cases to run (repeatable): B1 ramps, B2 annual velocities, B3 GP "
                                            "surface, B4 `gia run` end to end (minutes)."),
        backend: str = typer.Option("auto", "--backend", help="auto | numpy | cupy"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write every figure as JSON."),
        workers: Optional[int] = typer.Option(None, "--workers",
                                              help="B4: also run each velocity case on this many local Dask "
                                                   "workers, against the same run in one process (speed-up, "
                                                   "memory, products compared bit for bit)."),
    ) -> None:
        """Run the benchmark cases and print times and ratios measured in the same run."""
        from .bench import print_table, run_bench

        print_table(run_bench(size=size, cases=tuple(case), backend=backend, out_json=json_out, workers=workers))

    @app.command("report")
    def report_cmd(out: Path = typer.Argument(..., help="A `gia run` output folder.")) -> None:
        """(Re)write report.html and figures/ from a run's summary.json and rasters."""
        from .validate import rewrite_report

        typer.echo(str(rewrite_report(out)))

    return app


def _check(frames, gnss, holdout, reference_frame: str, *, as_json: bool, **more) -> int:
    """Run the input checks, print the table (or JSON), and return the exit code (2 when errors were found);
    ``more``: the further arguments of :func:`~gpu_insar_adjust.checks.check_inputs`."""
    from .checks import check_inputs

    report = check_inputs(frames, gnss, holdout, reference_frame=reference_frame, **more)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        from rich.console import Console

        Console().print(report.to_table())
        n_err, n_warn = len(report.errors), len(report.warnings)
        print(f"{n_err} error(s), {n_warn} warning(s)" + ("" if report.ok else " — fix the errors above first"))
    return 0 if report.ok else 2


def _logging(level: str = "INFO") -> None:
    from .logs import setup_logging

    setup_logging(level)


def _print_headline(summary: dict, validation: dict | None = None) -> None:
    """The figures a user looks at first, on stdout."""
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"subsidence area (> {summary.get('subsidence_threshold_mm_yr')} mm/yr): "
             f"{f(summary.get('subsidence_area_km2'), '{:,.0f}')} km²",
             f"max / mean subsidence rate: {f(summary.get('max_subsidence_rate_mm_yr'))} / "
             f"{f(summary.get('mean_subsidence_rate_mm_yr'))} mm/yr"]
    net = summary.get("network") or {}
    if net.get("overlap_rms_before_mm_yr") is not None:
        lines.append(f"overlap RMS before / after network: {f(net['overlap_rms_before_mm_yr'])} / "
                     f"{f(net.get('overlap_rms_after_mm_yr'))} mm/yr")
    if net.get("overlap_rms_all_pixels_after_mm_yr") is not None:
        lines.append(f"overlap RMS over all overlap pixels: {f(net['overlap_rms_all_pixels_before_mm_yr'])} / "
                     f"{f(net['overlap_rms_all_pixels_after_mm_yr'])} mm/yr")
    for kind, d in (net.get("overlap_rms_by_kind") or {}).items():
        if d.get("rms_after_mm_yr") is not None:
            lines.append(f"  {kind} ({d['n_pairs']} pairs): {f(d.get('rms_before_mm_yr'))} / "
                         f"{f(d['rms_after_mm_yr'])} mm/yr")
    val = (summary.get("validation") or {}).get("overall")
    if val:
        lines.append(f"held-out GNSS (vertical): RMSE {f(val.get('rmse'), '{:.2f}')} mm/yr, bias "
                     f"{f(val.get('bias'), '{:.2f}')}, n {val.get('n')}")
    base = ((summary.get("baseline") or {}).get("validation") or {}).get("overall")
    if base:
        lines.append(f"baseline (plane per frame + averaging): RMSE {f(base.get('rmse'), '{:.2f}')} mm/yr")
    if summary.get("annual_mean_subsidence_rate_mm_yr"):
        rates = ", ".join(f"{y}: {v:.1f}" for y, v in summary["annual_mean_subsidence_rate_mm_yr"].items())
        lines.append(f"annual mean subsidence rate (mm/yr): {rates}; peak year {summary.get('peak_year')}")
        lines.append(f"max cumulative subsidence: {f(summary.get('max_cumulative_subsidence_mm'), '{:.0f}')} mm")
    gw = summary.get("groundwater") or {}
    if gw.get("total_loss_m3") is not None:
        per = "; ".join(f"{p['start']}..{p['end']}: {p['loss_m3'] / 1e9:.2f}" for p in gw.get("periods", []))
        lines.append(f"groundwater storage loss: {gw['total_loss_m3'] / 1e9:.2f} billion m³ ({per})")
    if validation and validation.get("truth"):
        t = validation["truth"]
        lines.append(f"against the truth grid: RMSE {f(t.get('rmse'), '{:.2f}')} mm/yr; subsidence area "
                     f"{f(t.get('area_error_percent'), '{:+.1f}')} % vs truth")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gia`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if _fast_version(argv):
        return 0
    from .errors import GiaError

    app = _build_app()
    try:
        rv = app(args=argv, prog_name="gia", standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool):  # typer.Exit(code) comes back as the return value
            return rv
    except GiaError as exc:
        if _DEBUG:
            import traceback

            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:  # typer.Exit and click's own exits
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # click's exceptions (typer may vendor click, so match them by shape rather than by class)
        kind = type(exc).__name__
        if kind == "Exit" and hasattr(exc, "exit_code"):
            return int(exc.exit_code)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # ClickException, UsageError, BadParameter
            exc.show()
            return 2
        if kind == "Abort":
            print("aborted", file=sys.stderr)
            return 1
        import traceback

        from .versions import show_versions

        traceback.print_exc()
        print("\nThis is an internal error of gpu_insar_adjust; please report it with the versions below.\n",
              file=sys.stderr)
        print(show_versions(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
