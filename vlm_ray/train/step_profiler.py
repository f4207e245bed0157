"""torch.profiler over a few optimiser steps of a real training run (spec train.profile_steps).

Where a training step's time goes decides which lever helps: at small batches a vision-LM
step with LoRA on every linear layer can be bound by the CPU launching kernels, not by the
GPU running them (docs/benchmarks.md, training run 4), and only a profile of the run's own
steps, with its data, model and settings, tells. The profiled window starts after
train.profile_start_step (compilation and warm-up done), with one more step to warm the
profiler itself up, and its tables and a summary go to <run>/train/profile/. No trace file:
three steps of a 7B model make one of hundreds of MB.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from transformers import TrainerCallback

from vlm_ray import layout
from vlm_ray.storage import Store

log = logging.getLogger(__name__)

_LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel")  # and their Ex / ExC variants


def gpu_busy_us(events: Any) -> float:
    """GPU kernel and copy time in a profile's key_averages(), counted once.

    key_averages() gives each op row the time of the kernels it launched and lists those kernels
    again as rows of their own, so a sum over every row counts the GPU twice; only device-side
    rows are summed, as the profiler's own "Self CUDA time total" does.
    """
    from torch.autograd import DeviceType

    return sum(
        e.self_device_time_total
        for e in events
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation
    )


def profile_summary(events: Any, wall_s: float, steps: int, on_gpu: bool) -> dict[str, Any]:
    """Per-step wall time, GPU-busy time and share, and kernel launches, from key_averages()."""
    step_ms = wall_s / steps * 1e3
    summary: dict[str, Any] = {"steps": steps, "step_ms": round(step_ms, 1)}
    if on_gpu:
        busy_ms = gpu_busy_us(events) / steps / 1e3
        launches = sum(e.count for e in events if e.key.startswith(_LAUNCH_CALLS))
        summary.update(
            gpu_busy_ms_per_step=round(busy_ms, 1),
            gpu_busy_share=round(busy_ms / step_ms, 3) if step_ms else None,
            kernel_launches_per_step=round(launches / steps),
        )
    return summary


class StepProfiler(TrainerCallback):
    """Profile `steps` optimiser steps after step start_step; upload tables and summary.json.

    The window's first step only warms the profiler up (CUPTI's start-up cost lands in it and
    would inflate the step time); it is left out of the tables and the summary.
    """

    def __init__(
        self, store: Store, start_step: int, steps: int, prefix: str = layout.TRAIN_PROFILE
    ):
        self.store, self.start_step, self.steps, self.prefix = store, start_step, steps, prefix
        self.summary: dict[str, Any] | None = None
        self._prof: Any = None
        # steps ended since the profiler started, the warm-up step included; 0: not started yet
        self._ended = 0

    def on_step_begin(self, args, state, control, **kwargs):
        # A resumed run that restarts inside the window profiles from there on.
        inside = self.start_step <= state.global_step < self.start_step + self.steps
        if self._ended == 0 and self._prof is None and inside:
            import torch
            from torch.profiler import ProfilerActivity, profile, schedule

            self._on_gpu = torch.cuda.is_available()
            activities = [ProfilerActivity.CPU]
            if self._on_gpu:
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(
                activities=activities, schedule=schedule(wait=0, warmup=1, active=1)
            )
            self._prof.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self._prof is None:
            return
        self._ended += 1
        self._t_last = time.perf_counter()
        if self._ended == 1:  # the warm-up step is over: record from here
            self._sync()
            self._prof.step()
            self._first, self._t0 = state.global_step + 1, time.perf_counter()
        elif self._ended == 1 + self.steps:
            self._finish(self.steps)

    def on_train_end(self, args, state, control, **kwargs):
        if self._prof is not None:  # the run ended inside the window: time it to its last step
            self._finish(self._ended - 1, until=self._t_last)

    def _sync(self) -> None:
        if self._on_gpu:
            import torch

            torch.cuda.synchronize()

    def _finish(self, steps: int, until: float | None = None) -> None:
        import torch

        self._sync()
        wall = (until or time.perf_counter()) - self._t0 if steps > 0 else 0.0
        self._prof.stop()
        prof, self._prof = self._prof, None
        if steps <= 0:
            log.info("train: the run ended before a profiled step (train.profile_start_step)")
            return
        events = prof.key_averages()
        tables = {
            "by_self_cpu_time.txt": "self_cpu_time_total",
            "by_cpu_time.txt": "cpu_time_total",
        }
        if self._on_gpu:
            tables["by_gpu_time.txt"] = "self_cuda_time_total"
        for name, key in tables.items():
            table = events.table(sort_by=key, row_limit=50, max_name_column_width=90)
            self.store.write_text(f"{self.prefix}/{name}", table + "\n")
        self.summary = {
            "first_step": self._first,
            **profile_summary(events, wall, steps, self._on_gpu),
            "device": torch.cuda.get_device_name(0) if self._on_gpu else "cpu",
        }
        self.store.write_json(f"{self.prefix}/summary.json", self.summary)
        gpu = (
            f", GPU busy {self.summary['gpu_busy_ms_per_step']} ms "
            f"({100 * self.summary['gpu_busy_share']:.0f}%), "
            f"{self.summary['kernel_launches_per_step']:,} kernel launches per step"
            if self._on_gpu
            else ""
        )
        log.info(
            "train: profiled steps %d-%d: %.1f ms per step (profiler on)%s; tables in %s",
            self._first,
            self._first + steps - 1,
            self.summary["step_ms"],
            gpu,
            self.store.uri_of(self.prefix),
        )
