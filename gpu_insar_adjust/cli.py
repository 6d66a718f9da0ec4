"""The ``gia`` command: a thin shell over :mod:`gpu_insar_adjust.pipeline` and friends.

Exit codes: 0 success; 2 a problem with the user's input or request (a :class:`GiaError`, printed without a
traceback unless ``--debug``); 1 an unexpected internal error (traceback and versions printed, please report).
"""

from __future__ import annotations

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
    ) -> None:
        """Write the embedded North China Plain scenario (frames, GNSS, held-out GNSS, truth)."""
        _not_built("synth", "the embedded scenario")

    @app.command("run")
    def run_cmd(
        frames: Path = typer.Option(..., "--frames", help="Folder with one sub-folder per frame (LiCSAR/LiCSBAS "
                                                          "or MintPy layout)."),
        gnss: Path = typer.Option(..., "--gnss", help="GNSS velocities: CSV station,lon,lat,ve,vn,vu,se,sn,su "
                                                      "(mm/yr) or a MIDAS file."),
        out: Path = typer.Option(..., "--out", help="Output folder."),
    ) -> None:
        """Adjust every frame to GNSS, merge them by network least squares, mosaic, and analyse."""
        _not_built("run", "the end-to-end pipeline")

    @app.command("demo")
    def demo_cmd() -> None:
        """Synthesise the embedded scenario, run the whole pipeline on it and validate against its truth."""
        _not_built("demo", "the end-to-end demo")

    @app.command("validate")
    def validate_cmd(out: Path = typer.Argument(..., help="A `gia run` output folder.")) -> None:
        """Compare a run's vertical velocity with held-out GNSS and/or a truth grid."""
        _not_built("validate", "validation against held-out GNSS and truth")

    @app.command("bench")
    def bench_cmd() -> None:
        """Run the benchmark cases and print times and ratios measured in the same run."""
        _not_built("bench", "the benchmark runner")

    return app


def _not_built(command: str, what: str) -> None:
    from .errors import NotBuiltError

    raise NotBuiltError(f"`gia {command}` ({what}) is not built yet in this version.", field=command,
                        fix="upgrade gpu_insar_adjust, or use the Python API for the stages that exist")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gia`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if _fast_version(argv):
        return 0
    from .errors import GiaError

    app = _build_app()
    try:
        app(args=argv, prog_name="gia", standalone_mode=False)
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
