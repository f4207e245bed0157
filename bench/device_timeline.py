"""How busy the device was during one profiled call, where it sat idle, and what the host did then.

torch.profiler's kernel tables say what the GPU ran, not whether it waited. The union of the
device's kernel intervals over the call's wall span gives the busy fraction; its largest idle
gaps, with the kernels either side, say where it waited. For each gap this also names what each
host thread was doing meanwhile (the most specific profiled range covering most of the gap), and
sums the idle time spent while a thread was inside each of our own labelled phases
(`vlm_ray.*` ranges, torch.profiler.record_function in vlm_ray/infer/generation.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

PHASE_PREFIX = "vlm_ray."


@dataclass(frozen=True)
class Span:
    """One profiled interval, in microseconds: a kernel on the device, or a range on a host thread."""

    start: float
    end: float
    name: str
    thread: int = 0


def all_threads_config():
    """torch.profiler's experimental_config that records every thread's ops, or None where unknown.

    By default the profiler records the CPU ops of the thread that started it only; the batch
    being prepared in a worker thread beside generation would be missing from the host side.
    """
    import torch

    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        return None


def spans_from_profile(events, device: str) -> tuple[list[Span], list[Span]]:
    """(device spans, host spans) from torch.profiler's prof.events(); device is "CUDA" or "CPU"."""
    kernels, host = [], []
    for e in events:
        if e.time_range.end <= e.time_range.start:
            continue
        span = Span(e.time_range.start, e.time_range.end, e.name, getattr(e, "thread", 0))
        if e.device_type.name == device:
            kernels.append(span)
        if e.device_type.name == "CPU":
            host.append(span)
    return kernels, host


def idle_gaps(kernels: list[Span]) -> tuple[float, list[tuple[float, float, str, str]]]:
    """Busy time, and every idle gap between the kernels' union as (start, end, after, before)."""
    spans = sorted(kernels, key=lambda s: (s.start, s.end))
    busy, gaps = 0.0, []
    cur_start, cur_end, cur_name = spans[0].start, spans[0].end, spans[0].name
    for s in spans[1:]:
        if s.start > cur_end:
            busy += cur_end - cur_start
            gaps.append((cur_end, s.start, cur_name, s.name))
            cur_start = s.start
        if s.end >= cur_end:
            cur_end, cur_name = s.end, s.name
    busy += cur_end - cur_start
    return busy, gaps


def _overlap(start: float, end: float, span: Span) -> float:
    """How long `span` overlaps [start, end] (negative or zero: not at all)."""
    return min(end, span.end) - max(start, span.start)


def host_during(start: float, end: float, host: list[Span], threads: int = 3) -> list[dict]:
    """Per host thread, the most specific range that covers most of [start, end].

    Among the ranges overlapping the gap, a thread's pick overlaps it the most, and of those
    the shortest (the innermost); threads are listed by that overlap, largest first.
    """
    best: dict[int, tuple[float, float, str]] = {}
    for s in host:
        overlap = _overlap(start, end, s)
        if overlap <= 0:
            continue
        key = (overlap, -(s.end - s.start), s.name)
        if s.thread not in best or key > best[s.thread]:
            best[s.thread] = key
    ranked = sorted(best.items(), key=lambda kv: kv[1], reverse=True)[:threads]
    return [
        {"thread": t, "in": name[:60], "overlap_ms": round(overlap / 1e3, 2)}
        for t, (overlap, _, name) in ranked
    ]


def idle_by_phase(gaps: list[tuple[float, float, str, str]], host: list[Span]) -> dict[str, float]:
    """Idle device ms while some thread was inside each vlm_ray.* phase (phases may overlap)."""
    phases = [s for s in host if s.name.startswith(PHASE_PREFIX)]
    out: dict[str, float] = defaultdict(float)
    for g_start, g_end, _, _ in gaps:
        for p in phases:
            overlap = _overlap(g_start, g_end, p)
            if overlap > 0:
                out[p.name] += overlap
    return {name: round(us / 1e3, 1) for name, us in sorted(out.items(), key=lambda kv: -kv[1])}


def device_timeline(events, device: str, gaps: int = 12) -> dict:
    """Busy share, idle gaps and the host's doings in them, for one profiled call's events."""
    kernels, host = spans_from_profile(events, device)
    if not kernels:
        return {"device": device, "kernels": 0}
    everything = kernels + host
    first = min(s.start for s in everything)
    wall = max(s.end for s in everything) - first
    busy, all_gaps = idle_gaps(kernels)
    first_kernel = min(s.start for s in kernels)
    largest = sorted(all_gaps, key=lambda g: g[1] - g[0], reverse=True)[:gaps]
    over_1ms = [g for g in all_gaps if g[1] - g[0] > 1e3]
    return {
        "device": device,
        "kernels": len(kernels),
        "wall_ms": round(wall / 1e3, 1),
        "busy_ms": round(busy / 1e3, 1),
        "busy_fraction": round(busy / wall, 3),
        "idle_gaps_over_1ms": len(over_1ms),
        "idle_ms_in_gaps_over_1ms": round(sum(e - s for s, e, _, _ in over_1ms) / 1e3, 1),
        "host_threads": len({s.thread for s in host}),  # 1: only the caller's (all_threads_config)
        "idle_ms_by_phase": idle_by_phase(all_gaps, host),
        "largest_gaps": [
            {
                "ms": round((e - s) / 1e3, 2),
                "at_ms": round((s - first_kernel) / 1e3, 1),  # from the first kernel
                "after": a[:60],
                "before": b[:60],
                "host": host_during(s, e, host),
            }
            for s, e, a, b in largest
        ],
    }
