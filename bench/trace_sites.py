"""Which Python code issues given host-side events (cudaMemcpyAsync, ...) in a torch.profiler trace.

torch's sync debug mode only sees synchronising calls that go through torch's own copy and
item paths; a copy issued elsewhere (a C extension, a ctypes call) is invisible to it, and
the profiler's tables name the event but not its caller. A profile taken with
`with_stack=True` records the Python calls as `python_function` events on the same thread's
timeline, so each event's enclosing Python frames are the calls whose spans contain it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

# Frames from these places say nothing about who asked for the event (trace names are paths
# relative to site-packages, or absolute).
_SKIP = ("torch/", "<built-in", "threading.py", "contextlib.py", "functools.py", "warnings.py")


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
    events = json.loads(Path(trace).read_text())["traceEvents"]
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
