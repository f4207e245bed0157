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
from collections.abc import Callable, Iterator
from pathlib import Path

# Frames from these places say nothing about who asked for the event (trace names are paths
# relative to site-packages, or absolute).
_SKIP = ("torch/", "<built-in", "threading.py", "contextlib.py", "functools.py", "warnings.py")


Trace = str | Path | list[dict]


def load_trace(trace: str | Path) -> list[dict]:
    """A chrome trace's events; a name ending in .gz is read through gzip. Load once and pass
    the list to both event_sites and gpu_time_sites: a profiled step's trace can be large."""
    path = Path(trace)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(raw)["traceEvents"]


def _events(trace: Trace) -> list[dict]:
    return trace if isinstance(trace, list) else load_trace(trace)


_TARGET_RANK = 1 << 30  # after any frame that starts and ends with the target


def _enclosed(
    events: list[dict], frame_rank: Callable[[dict], int | None], is_target: Callable[[dict], bool]
) -> Iterator[tuple[dict, list[dict]]]:
    """Each target event with the frame events open around it on its thread, innermost first.

    Frames are the complete events `frame_rank` ranks (Python calls, operators); where frames
    start and end together, the lower rank is the outer one. A frame starting with a target
    encloses it.
    """
    timelines: dict[tuple, list[tuple[float, float, int, int]]] = {}
    for i, e in enumerate(events):
        if e.get("ph") != "X":
            continue
        rank = frame_rank(e)
        if rank is None:
            if not is_target(e):
                continue
            rank = _TARGET_RANK
        start = float(e["ts"])
        # Longer events first among those starting together: they enclose.
        timelines.setdefault((e.get("pid"), e.get("tid")), []).append(
            (start, -(start + float(e.get("dur", 0))), rank, i)
        )
    for timeline in timelines.values():
        timeline.sort()
        open_frames: list[tuple[float, dict]] = []  # (end, event), outermost first
        for start, neg_end, rank, i in timeline:
            while open_frames and open_frames[-1][0] < start:
                open_frames.pop()
            if rank == _TARGET_RANK:
                yield events[i], [f for _, f in reversed(open_frames)]
            else:
                open_frames.append((-neg_end, events[i]))


def _python_frame_rank(e: dict) -> int | None:
    return 0 if e.get("cat") == "python_function" else None


def _python_or_operator_rank(e: dict) -> int | None:
    """Python calls enclose the operators they start when both begin and end together."""
    return {"python_function": 0, "cpu_op": 1}.get(e.get("cat"))


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


def event_sites(trace: Trace, names: tuple[str, ...], depth: int = 4) -> Counter:
    """Count the events called `names` in a chrome trace by their innermost non-torch Python frames.

    The key is up to `depth` frames, innermost first, joined by " <- "; an event with no such
    frame around it counts under "(no Python frame)".
    """

    def named(e: dict) -> bool:
        return e.get("name") in names

    sites: Counter = Counter()
    for _, frames in _enclosed(_events(trace), _python_frame_rank, named):
        sites[call_site([_frame(f["name"]) for f in frames], depth)] += 1
    return sites


# The host-side calls that put work on the GPU: a GPU event's `correlation` names one of these.
_LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
_GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _correlation(e: dict) -> int:
    return int(e.get("args", {}).get("correlation", -1))


def _op_chain(ops: list[str], depth: int) -> str:
    """Up to `depth` enclosing operator names, innermost first (autograd's node names say which
    backward formula ran, where the Python stack is empty: the backward runs on torch's own
    threads)."""
    return " <- ".join(ops[:depth]) or "(no operator)"


def gpu_time_sites(
    trace: Trace, patterns: tuple[str, ...], depth: int = 4
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

    def is_launch(e: dict) -> bool:
        return e.get("cat") in _LAUNCH_CATEGORIES and _correlation(e) in gpu_ms

    sites: dict[str, dict[str, float]] = {}
    for launch, frames in _enclosed(events, _python_or_operator_rank, is_launch):
        ops = [f["name"] for f in frames if f.get("cat") == "cpu_op"]
        python = [_frame(f["name"]) for f in frames if f.get("cat") == "python_function"]
        gpu_name, ms = gpu_ms[_correlation(launch)]
        key = f"{gpu_name[:80]} <= {_op_chain(ops, depth)} | {call_site(python, depth)}"
        site = sites.setdefault(key, {"calls": 0, "gpu_ms": 0.0})
        site["calls"] += 1
        site["gpu_ms"] += ms
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
