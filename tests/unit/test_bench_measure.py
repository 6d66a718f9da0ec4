"""``gia bench``'s process measurement: the memory of worker processes a run starts is counted."""

from __future__ import annotations

import sys

from gpu_insar_adjust.bench import measure_process

_PARENT = r"""
import subprocess, sys, time
print("worker stage ...", flush=True)
child = subprocess.Popen([sys.executable, "-c",
                          "import time, numpy as np; a = np.ones(300 * 2**20 // 8); time.sleep(1.5)"])
child.wait()
"""


def test_peak_memory_counts_the_workers_of_a_run(tmp_path):
    """A run whose own process stays small but whose worker holds 300 MiB reports that memory: as the workers'
    peak, in the run's peak, and under the stage that was running."""
    res = measure_process([sys.executable, "-c", _PARENT], tmp_path / "log.txt", poll_s=0.05)
    assert res["returncode"] == 0
    assert 280 <= res["peak_rss_workers_mib"] <= 600
    assert res["peak_rss_mib"] >= res["peak_rss_workers_mib"] + 5  # plus the parent itself
    assert res["peak_rss_mib_by_stage"]["worker stage"] >= 280
