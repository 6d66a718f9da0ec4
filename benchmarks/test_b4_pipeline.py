"""B4: `gia run` end to end on the embedded scenario: wall time, peak RSS, the share of each stage, and the
time-series variant at two epoch spacings (peak memory should not grow with the number of epochs)."""

from conftest import report

from gpu_insar_adjust import bench


def test_b4_gia_run(bench_size, bench_backend, bench_results):
    params = bench.SIZES[bench_size]["B4"]
    res = bench.bench_b4(**params, backend=bench_backend)
    res["params"] = params
    report(bench_results, "B4", res)
    failed = {k: v["failed"] for part in ("velocity", "timeseries") for k, v in res[part].items() if "failed" in v}
    assert not failed, failed
    for part in ("velocity", "timeseries"):
        for r in res[part].values():
            assert r["stage_seconds"] and abs(sum(r["stage_share"].values()) - 1.0) < 1e-9
