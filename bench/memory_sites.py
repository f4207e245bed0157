"""What fills GPU memory at a training step's peak, by the Python code that allocated it.

The peak GiB a benchmark reports says how much, not what. torch's allocator can record every
allocation and free with its Python stack (torch.cuda.memory._record_memory_history); replaying
those events gives the set of blocks alive at the highest point, and summing them by call site
(bench/trace_sites.call_site) names what the peak is made of: saved activations of which layer
code, optimizer state, a loss buffer. Memory allocated before recording began (the weights) is
reported as the base, and broken down by parameter group with `parameter_bytes`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from bench.trace_sites import call_site

GIB = 1024**3


def _frames(entry: dict[str, Any]) -> list[tuple[str, str, str]]:
    """An allocator trace entry's Python frames as (path, line, function), innermost first."""
    return [(f["filename"], str(f["line"]), f["name"]) for f in entry.get("frames", [])]


def peak_live_sites(trace: Iterable[dict[str, Any]], depth: int = 4) -> dict[str, Any]:
    """Replay one device's allocator trace; return the peak above the start and what was alive then.

    `trace` is `torch.cuda.memory._snapshot()["device_traces"][device]`: entries with an
    "action" ("alloc", "free_requested", "free_completed", segment events...), "addr", "size" and
    "frames". A block counts from its "alloc" until its "free_requested" (as
    torch.cuda.memory_allocated does); frees of blocks allocated before recording are ignored.
    Returns {"peak_bytes": ..., "sites": Counter of live bytes at the peak by call site}.
    """
    entries = list(trace)
    # First the height and place of the peak, then the blocks alive there (one replay each,
    # rather than a copy of the live set at every new high).
    now = peak = peak_at = 0
    live_sizes: dict[int, int] = {}
    for i, entry in enumerate(entries):
        action = entry.get("action")
        if action == "alloc":
            live_sizes[entry["addr"]] = entry["size"]
            now += entry["size"]
            if now > peak:
                peak, peak_at = now, i
        elif action == "free_requested" and entry["addr"] in live_sizes:
            now -= live_sizes.pop(entry["addr"])
    at_peak: dict[int, tuple[int, dict[str, Any]]] = {}
    for entry in entries[: peak_at + 1] if peak else []:
        action = entry.get("action")
        if action == "alloc":
            at_peak[entry["addr"]] = (entry["size"], entry)
        elif action == "free_requested":
            at_peak.pop(entry["addr"], None)
    sites: Counter = Counter()
    for size, entry in at_peak.values():
        sites[call_site(_frames(entry), depth)] += size
    return {"peak_bytes": peak, "sites": sites}


def parameter_bytes(model: Any, parts: dict[str, str]) -> Counter:
    """Bytes of the model's parameters and buffers by part: the first key of `parts` (a name ->
    substring map, in order) whose substring is in the tensor's name, else "other"; trainable
    parameters are counted apart under "trainable"."""
    out: Counter = Counter()
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if getattr(t, "requires_grad", False):
            out["trainable"] += nbytes
            continue
        out[next((k for k, s in parts.items() if s in name), "other")] += nbytes
    return out


def gib(counter: Counter, top: int = 20) -> dict[str, float]:
    """The `top` largest entries of a byte counter in GiB, 3 decimals."""
    return {k: round(v / GIB, 3) for k, v in counter.most_common(top)}
