"""clients/agent/profile.py: the measured speed attributes the planner's roofline uses."""
from __future__ import annotations

import time

from clients.agent import profile


def test_measure_speed_is_cheap_and_plausible():
    """A buffer copy and an sgemm, well under a second; numbers a real CPU gives (0.5–2000 GB/s,
    0.5–100k GFLOP/s)."""
    start = time.perf_counter()
    speed = profile.measure_speed()
    elapsed = time.perf_counter() - start
    assert set(speed) == {"mem_bandwidth_gbps", "fp32_gflops"}
    assert 0.5 < float(speed["mem_bandwidth_gbps"]) < 2000
    assert 0.5 < float(speed["fp32_gflops"]) < 100_000
    assert elapsed < 1.5                        # budget 0.4 s plus allocation on a busy 2-core machine


def test_detect_adds_the_measurements_and_keeps_the_rest():
    measured, _ = profile.detect({"device": "bench"})
    plain, _ = profile.detect({"device": "bench"}, measure=False)
    assert "mem_bandwidth_gbps" in measured and "fp32_gflops" in measured
    assert "mem_bandwidth_gbps" not in plain
    for key in ("os", "arch", "cpu", "cores", "ram_bytes", "python"):
        assert measured[key] == plain[key]
    assert measured["device"] == "bench"


def test_the_planner_reads_the_agents_measurements():
    from shared.planner import device_profile
    attributes, _ = profile.detect()
    device = device_profile(attributes)
    assert device.basis.startswith("measured by the agent: ")
    assert device.bandwidth_bytes_per_s == float(attributes["mem_bandwidth_gbps"]) * 1e9
    assert device.memory_bytes == int(attributes["ram_bytes"]) - (1 << 30)
