"""benchmarks/gpu_clocks.py: the clock/power summary beside each grouped-GEMM timing, and that a
machine without NVML (CI, a CPU run) gets an empty summary rather than an error."""

from __future__ import annotations

import time

import pytest

from benchmarks import gpu_clocks


def test_summary_averages_the_samples():
    sampler = gpu_clocks.ClockSampler()
    sampler.samples = [(1980, 600.0, False), (1400, 700.0, True), (1420, 699.0, True),
                       (1400, 700.0, True)]
    assert sampler.sm_mhz == pytest.approx(1550.0)
    assert sampler.watts == pytest.approx(674.75)
    assert sampler.capped == pytest.approx(0.75)
    assert sampler.summary() == "sm 1550 MHz, 675 W, power-capped 75%"


def test_without_nvml_the_sampler_reports_nothing(monkeypatch):
    monkeypatch.setattr(gpu_clocks, "sample", lambda: None)
    with gpu_clocks.ClockSampler(period_s=0.001) as sampler:
        sum(range(10_000))
    assert sampler.samples == []
    assert sampler.sm_mhz is None and sampler.capped is None
    assert sampler.summary() == ""


def test_a_sampling_thread_collects_while_the_body_runs(monkeypatch):
    readings = iter([(1980, 150.0, False)] * 1000)
    monkeypatch.setattr(gpu_clocks, "sample", lambda: next(readings))
    with gpu_clocks.ClockSampler(period_s=0.001) as sampler:
        time.sleep(0.05)
    n = len(sampler.samples)
    assert n >= 5, n  # about 50 at 1 ms; a loaded 2-core CI machine gets fewer
    assert sampler.summary() == "sm 1980 MHz, 150 W, power-capped 0%"
