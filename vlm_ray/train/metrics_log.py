"""Training metrics: one JSON line per logging step in <run>/train/metrics.jsonl, and a progress line on stdout.

Engine-agnostic (any transformers.Trainer subclass). The file lives in object
storage, where there is no append: lines are kept in memory and the whole file
is rewritten at each checkpoint, at the end, and at most every `flush_every_s`
seconds, so logging costs no extra synchronisation per step.
"""

from __future__ import annotations

import json
import time
from typing import Any

from transformers import TrainerCallback

from vlm_ray import layout
from vlm_ray.storage import Store


def memory_gib() -> tuple[str, float]:
    """("gpu", peak allocated GiB) on CUDA, else ("rss", resident GiB of this process)."""
    import torch

    if torch.cuda.is_available():
        return "gpu", torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return "rss", psutil.Process().memory_info().rss / 2**30


def read_metrics(store: Store, key: str = layout.TRAIN_METRICS) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (empty if there is none yet)."""
    if not store.exists(key):
        return []
    return [json.loads(line) for line in store.read_text(key).splitlines() if line.strip()]


def _fmt_duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLog(TrainerCallback):
    """Record loss, learning rate, grad norm, samples/s and memory per logging step; print a progress line."""

    def __init__(
        self,
        store: Store,
        key: str = layout.TRAIN_METRICS,
        flush_every_s: float = 30.0,
        print_progress: bool = True,
    ):
        self.store = store
        self.key = key
        self.flush_every_s = flush_every_s
        self.print_progress = print_progress
        self.records: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # After a restart the state is already the checkpoint's: keep what was logged up to
        # it and drop the rest, which this attempt logs again.
        self.records = [
            r for r in read_metrics(self.store, self.key) if r["step"] <= state.global_step
        ]
        self._last_time = time.time()
        self._last_step = state.global_step
        self._last_flush = time.time()
        self._start = time.time()
        self._start_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        record: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch, "time": now}
        record.update(logs)
        if "loss" in logs:
            samples = (
                (state.global_step - self._last_step)
                * args.per_device_train_batch_size
                * args.gradient_accumulation_steps
                * max(1, args.world_size)
            )
            dt = max(now - self._last_time, 1e-9)
            kind, gib = memory_gib()
            record["samples_per_second"] = round(samples / dt, 3)
            record[f"memory_{kind}_gib"] = round(gib, 3)
            self._last_time, self._last_step = now, state.global_step
            if self.print_progress:
                self._print(state, record, kind, gib, now)
        self.records.append(record)
        if now - self._last_flush >= self.flush_every_s:
            self.flush()

    def _print(self, state, record: dict[str, Any], kind: str, gib: float, now: float) -> None:
        done = state.global_step - self._start_step
        left = state.max_steps - state.global_step
        eta = (now - self._start) / done * left if done > 0 else 0.0
        grad = record.get("grad_norm")
        print(
            f"train step {state.global_step}/{state.max_steps} "
            f"({100 * state.global_step / max(state.max_steps, 1):.0f}%) "
            f"epoch {state.epoch or 0:.2f} loss {record['loss']:.4f} "
            f"lr {record.get('learning_rate', 0):.2e} "
            f"grad_norm {grad if grad is None else f'{grad:.3f}'} "
            f"samples/s {record['samples_per_second']:.2f} {kind} {gib:.2f} GiB "
            f"eta {_fmt_duration(eta)}",
            flush=True,
        )

    def flush(self) -> None:
        """Write every record so far to the store (whole file, atomically)."""
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        self.store.write_text(self.key, text)
        self._last_flush = time.time()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.flush()
