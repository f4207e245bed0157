"""What the machine was doing while a benchmark ran: host load, CPU clock, GPU clock and power.

The batch-4 training step is bound by the host, and the same setup has measured far apart in
different runs of one hold (HF 4.0-7.1 samples/s, ours 6.9-10.7; docs/benchmarks.md). A
ConditionsSampler records, every few seconds while a benchmark's child process runs, the 1-minute
load average, the mean CPU clock (/proc/cpuinfo) and, where nvidia-smi answers, the GPU's SM clock,
power draw, temperature and utilisation; `window` summarises the samples of the timed steps, so
a slow run can be told apart from a slow machine.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable

GPU_FIELDS = {
    "clocks.sm": "gpu_sm_mhz",
    "power.draw": "gpu_power_w",
    "temperature.gpu": "gpu_temp_c",
    "utilization.gpu": "gpu_util_pct",
}


def host_sample(cpuinfo: str = "/proc/cpuinfo") -> dict[str, float]:
    """The 1-minute load average and the mean of the cores' current clocks (MHz), where known."""
    sample = {"load_1m": os.getloadavg()[0]}
    try:
        with open(cpuinfo) as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
    except OSError:
        mhz = []
    if mhz:
        sample["cpu_mhz"] = statistics.mean(mhz)
    return sample


def gpu_sample(index: str | None = None) -> dict[str, float]:
    """The GPU's SM clock, power, temperature and utilisation from nvidia-smi ({} without one)."""
    cmd = [
        "nvidia-smi",
        f"--query-gpu={','.join(GPU_FIELDS)}",
        "--format=csv,noheader,nounits",
    ]
    if index:
        cmd += ["-i", index.split(",")[0]]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    lines = out.strip().splitlines()
    if not lines:
        return {}
    sample = {}
    for name, value in zip(GPU_FIELDS.values(), lines[0].split(","), strict=False):
        with contextlib.suppress(ValueError):  # "[N/A]" where a GPU does not report it
            sample[name] = float(value)
    return sample


def summarise_window(
    samples: list[tuple[float, dict[str, float]]], start: float, end: float
) -> dict[str, dict[str, float]]:
    """{metric: {median, min, max}} over the samples taken between start and end (time.time())."""
    inside = [values for t, values in samples if start <= t <= end]
    metrics = sorted({name for values in inside for name in values})
    summary = {}
    for name in metrics:
        series = [values[name] for values in inside if name in values]
        summary[name] = {
            "median": round(statistics.median(series), 1),
            "min": round(min(series), 1),
            "max": round(max(series), 1),
        }
    return {"samples": len(inside), **summary} if inside else {"samples": 0}


class ConditionsSampler:
    """Samples `read()` every `every` seconds in a daemon thread between start() and stop()."""

    def __init__(self, every: float = 2.0, read: Callable[[], dict[str, float]] | None = None):
        self.every = every
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.read = read or (lambda: {**host_sample(), **gpu_sample(gpu)})
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self.read()))
            self._stop.wait(self.every)

    def start(self) -> ConditionsSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def window(self, start: float, end: float) -> dict[str, dict[str, float]]:
        """The samples between start and end, summarised (see summarise_window)."""
        return summarise_window(list(self.samples), start, end)
