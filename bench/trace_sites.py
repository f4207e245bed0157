"""Which Python code issues given host-side events (cudaMemcpyAsync, ...) in a torch.profiler trace.

torch's sync debug mode only sees synchronising calls that go through torch's own copy and
item paths; a copy issued elsewhere (a C extension, a ctypes call) is invisible to it, and
the profiler's tables name the event but not its caller. A profile taken with
`with_stack=True` records the Python calls as `python_function` events on the same thread's
timeline, so each event's enclosing Python frames are the calls whose spans contain it.

A trace brought back from the GPU machine (gzipped or not) can be asked again here, for any
kernel, without device time:

    python -m bench.trace_sites copy_sites_7b_bs32.json.gz --gpu "Memcpy DtoD" --gpu nvjet
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from pathlib import Path

# Frames from these places say nothing about who asked for the event (trace names are paths
# relative to site-packages, or absolute).
_SKIP = ("torch/", "<built-in", "threading.py", "contextlib.py", "functools.py", "warnings.py")


def _events(trace: str | Path) -> list[dict]:
    """A chrome trace's events; a name ending in .gz is read through gzip."""
    path = Path(trace)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(raw)["traceEvents"]


def call_site(frames: list[tuple[str, str, str]], depth: int = 4) -> str:
    """A call site's key from (path, line, function) frames, innermost first: up to `depth`
    frames outside torch and the standard plumbing, as 'file.py:12 func', joined by " <- "."""
    kept = [
        f"{Path(path).name}:{line} {func}"
        for path, line, func in frames
        if not any(path.startswith(s) or f"/{s}" in path for s in _SKIP)
    ]
    return " <- ".join(kept[:depth]) or "(no Python frame)"


def _frame(name: str) -> tuple[str, str, str]:
    """A trace's 'path/to/file.py(12): func' -> (path, line, func)."""
    where, _, func = name.partition(": ")
    path, _, line = where.rpartition("(")
    return (path, line.rstrip(")"), func) if path else (name, "", "")


def event_sites(trace: str | Path, names: tuple[str, ...], depth: int = 4) -> Counter:
    """Count the events called `names` in a chrome trace by their innermost non-torch Python frames.

    The key is up to `depth` frames, innermost first, joined by " <- "; an event with no such
    frame around it counts under "(no Python frame)".
    """
    events = _events(trace)
    timelines: dict[tuple, list[tuple[float, float, int, str]]] = {}
    for e in events:
        if e.get("ph") != "X":
            continue
        python = e.get("cat") == "python_function"
        if not python and e.get("name") not in names:
            continue
        start, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))
        # Frames before events that start with them; longer frames first (they enclose).
        timelines.setdefault((e.get("pid"), e.get("tid")), []).append(
            (start, -end, 0 if python else 1, e["name"])
        )
    sites: Counter = Counter()
    for timeline in timelines.values():
        timeline.sort()
        open_frames: list[tuple[float, str]] = []  # (end, name), outermost first
        for start, neg_end, kind, name in timeline:
            while open_frames and open_frames[-1][0] < start:
                open_frames.pop()
            if kind == 0:
                open_frames.append((-neg_end, name))
                continue
            sites[call_site([_frame(n) for _, n in reversed(open_frames)], depth)] += 1
    return sites


# The host-side calls that put work on the GPU: a GPU event's `correlation` names one of these.
_LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
_GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _op_chain(ops: list[str], depth: int) -> str:
    """Up to `depth` enclosing operator names, innermost first (autograd's node names say which
    backward formula ran, where the Python stack is empty: the backward runs on torch's own
    threads)."""
    return " <- ".join(ops[:depth]) or "(no operator)"


def gpu_time_sites(
    trace: str | Path, patterns: tuple[str, ...], depth: int = 4
) -> dict[str, dict[str, float]]:
    """GPU time of the kernels and copies whose names contain any of `patterns`, by launcher.

    Each GPU event is joined to its host-side launch (cudaLaunchKernel, cuLaunchKernel,
    cudaMemcpyAsync...) by the trace's correlation id, and keyed by the GPU event's name (its
    first 80 characters), after " <= " the operators around the launch (`aten::copy_ <-
    aten::clone <- ...`, innermost first) and after " | " its Python call site (call_site).
    Returns {key: {"calls": n, "gpu_ms": total}}, the costliest first: the profiler's tables
    give a kernel's total, this says which code paid it.
    """
    events = _events(trace)
    gpu_ms: dict[int, tuple[str, float]] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in _GPU_CATEGORIES:
            continue
        if any(p in e.get("name", "") for p in patterns):
            gpu_ms[int(e["args"]["correlation"])] = (e["name"], float(e.get("dur", 0)) / 1000)
    timelines: dict[tuple, list[tuple[float, float, int, str, int]]] = {}
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat")
        if cat == "python_function":
            kind, corr = 0, -1
        elif cat == "cpu_op":
            kind, corr = 1, -1
        elif cat in _LAUNCH_CATEGORIES and int(e.get("args", {}).get("correlation", -1)) in gpu_ms:
            kind, corr = 2, int(e["args"]["correlation"])
        else:
            continue
        start, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))
        timelines.setdefault((e.get("pid"), e.get("tid")), []).append(
            (start, -end, kind, e["name"], corr)
        )
    sites: dict[str, dict[str, float]] = {}
    for timeline in timelines.values():
        timeline.sort()
        open_frames: list[tuple[float, int, str]] = []  # (end, kind, name), outermost first
        for start, neg_end, kind, name, corr in timeline:
            while open_frames and open_frames[-1][0] < start:
                open_frames.pop()
            if kind != 2:
                open_frames.append((-neg_end, kind, name))
                continue
            inner_first = list(reversed(open_frames))
            ops = [n for _, k, n in inner_first if k == 1]
            frames = [_frame(n) for _, k, n in inner_first if k == 0]
            gpu_name = gpu_ms[corr][0][:80]
            key = f"{gpu_name} <= {_op_chain(ops, depth)} | {call_site(frames, depth)}"
            site = sites.setdefault(key, {"calls": 0, "gpu_ms": 0.0})
            site["calls"] += 1
            site["gpu_ms"] += gpu_ms[corr][1]
    return dict(sorted(sites.items(), key=lambda kv: -kv[1]["gpu_ms"]))


def main(argv: list[str] | None = None) -> None:
    """Print the GPU time of the named kernels and copies in a trace by launcher, costliest first."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("trace", type=Path, help="a torch.profiler chrome trace (.json or .json.gz)")
    p.add_argument(
        "--gpu",
        action="append",
        required=True,
        metavar="NAME_PART",
        help="a part of the GPU events' names (a kernel's, or 'Memcpy DtoD'); repeatable",
    )
    p.add_argument("--depth", type=int, default=4, help="operators and Python frames per key")
    p.add_argument("--top", type=int, default=25, help="how many launchers to print")
    a = p.parse_args(argv)
    sites = gpu_time_sites(a.trace, tuple(a.gpu), a.depth)
    total_ms = sum(v["gpu_ms"] for v in sites.values())
    total_calls = sum(v["calls"] for v in sites.values())
    print(f"{total_calls} GPU events, {total_ms:.1f} ms, from {len(sites)} launchers")
    print("| GPU ms | calls | GPU event <= operators, innermost first | Python call site |")
    print("|---|---|---|---|")
    for key, v in list(sites.items())[: a.top]:
        launch, _, python = key.partition(" | ")
        print(f"| {v['gpu_ms']:.2f} | {v['calls']} | {launch} | {python} |")


if __name__ == "__main__":
    main()
