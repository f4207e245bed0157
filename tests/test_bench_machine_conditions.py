"""bench/machine_conditions.py: what the machine was doing during a benchmark's timed steps."""

from __future__ import annotations

import sys
import time

from bench.machine_conditions import ConditionsSampler, host_sample, summarise_window
from bench.train_speed import collect_results


def test_the_host_sample_has_the_load_and_the_cpu_clock_where_the_kernel_reports_it(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2000.0\nprocessor\t: 1\ncpu MHz\t\t: 3000.0\n")

    sample = host_sample(str(cpuinfo))

    assert sample["cpu_mhz"] == 2500.0
    assert sample["load_1m"] >= 0
    assert "cpu_mhz" not in host_sample(str(tmp_path / "none"))


def test_a_window_summarises_only_the_samples_inside_it():
    samples = [
        (10.0, {"cpu_mhz": 3000.0, "gpu_sm_mhz": 1980.0}),  # warm-up: outside
        (20.0, {"cpu_mhz": 2000.0, "gpu_sm_mhz": 1500.0}),
        (22.0, {"cpu_mhz": 2200.0}),  # no GPU reading this time
        (24.0, {"cpu_mhz": 2400.0, "gpu_sm_mhz": 1700.0}),
    ]

    window = summarise_window(samples, 19.0, 25.0)

    assert window["samples"] == 3
    assert window["cpu_mhz"] == {"median": 2200.0, "min": 2000.0, "max": 2400.0}
    assert window["gpu_sm_mhz"] == {"median": 1600.0, "min": 1500.0, "max": 1700.0}
    assert summarise_window(samples, 30.0, 40.0) == {"samples": 0}


def test_the_sampler_reads_until_stopped():
    reads = []
    sampler = ConditionsSampler(every=0.05, read=lambda: reads.append(1) or {"x": 1.0}).start()
    time.sleep(0.3)
    sampler.stop()
    count = len(sampler.samples)
    time.sleep(0.1)

    assert count >= 3 and len(sampler.samples) == count
    assert sampler.window(0, time.time())["x"]["median"] == 1.0


def test_a_child_s_answer_carries_the_conditions_of_its_timed_steps():
    # Ten 0.1 s timed steps end when the RESULT arrives; then the child "saves" for a second.
    code = (
        "import time; time.sleep(1.5); "
        'print(\'RESULT {"samples_per_s": 40.0, "step_ms": 100.0, "timed_steps": 10}\', '
        "flush=True); time.sleep(1)"
    )

    result = collect_results([sys.executable, "-c", code], conditions_every=0.2)

    conditions = result["conditions"]
    assert 3 <= conditions["samples"] <= 7  # the last second of the child's run, not all of it
    assert conditions["load_1m"]["min"] >= 0
