"""Benchmark suites B1-B4 (pytest-benchmark). Not collected by the default test run (testpaths = tests).

    pytest benchmarks                          # small size: seconds
    GIA_BENCH_SIZE=full pytest benchmarks      # the issue's sizes (B2: a 4 GB cube and its copies, use >= 16 GB of RAM)
    GIA_BENCH_JSON=benchmarks/results/x.json   # also write every figure with the machine description

Each case times this project's kernel with pytest-benchmark and, in the same run, the baselines (MintPy where
installed, a naive NumPy version, the memory floor); it prints the ratios, which are what to compare across
machines.
"""

from __future__ import annotations

import json
import os

import pytest

from gpu_insar_adjust import bench


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a benchmark case")


@pytest.fixture(scope="session")
def bench_size() -> str:
    size = os.environ.get("GIA_BENCH_SIZE", "small")
    if size not in bench.SIZES:
        pytest.exit(f"GIA_BENCH_SIZE={size!r}: use one of {sorted(bench.SIZES)}", returncode=4)
    return size


@pytest.fixture(scope="session")
def bench_backend() -> str:
    return os.environ.get("GIA_BENCH_BACKEND", "auto")


@pytest.fixture(scope="session")
def bench_results(bench_size):
    results: dict = {"machine": bench.machine_info(), "size": bench_size, "results": {}}
    yield results
    path = os.environ.get("GIA_BENCH_JSON")
    if path and results["results"]:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "w") as fh:
            json.dump(results, fh, indent=2, default=bench._json_default)
        os.replace(path + ".tmp", path)
    if results["results"]:
        bench.print_table(results)


@pytest.fixture
def ours_timer(benchmark):
    """Time this project's kernel with pytest-benchmark (best of its rounds) and hand the figure back."""

    def timer(func, repeats, sync=None):
        def call():
            func()
            if sync is not None:
                sync()

        benchmark.pedantic(call, rounds=repeats, iterations=1, warmup_rounds=0)
        return float(benchmark.stats.stats.min)

    return timer


def report(results: dict, case: str, res: dict) -> None:
    results["results"][case] = res
    print(f"\n{case} {res['shape']}: " + ", ".join(f"{k} {v:.3f} s" for k, v in res["times_s"].items()))
    print(f"{case} ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["ratios"].items()))
