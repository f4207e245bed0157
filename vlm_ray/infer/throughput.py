"""Per-actor throughput of an inference pool, from the shard ledger's commit records.

Each actor's first shard carries its model load and compilation, so an actor's steady rate is
the rows of its later shards over the time from its first commit to its last. The pool's steady
rate is the sum of its actors' (one window from the earliest first commit would count a later
actor's warm-up as idle time).
"""

from __future__ import annotations

from typing import Any


def actor_of(record: dict[str, Any]) -> str:
    """The actor that committed a shard: node:pid (pid alone in records from before node was kept)."""
    node = record.get("node")
    return f"{node}:{record['pid']}" if node else str(record["pid"])


def _by_actor(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each actor's commit records, in commit order."""
    by_actor: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["committed_at"]):
        by_actor.setdefault(actor_of(r), []).append(r)
    return by_actor


def actor_summary(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Shards, rows, steady images/s (None with a single shard), the GPU memory peak (None
    off GPUs) and how the GPU was shared (None unshared) of each actor in `records`."""
    summary = {}
    for actor, done in _by_actor(records).items():
        span = done[-1]["committed_at"] - done[0]["committed_at"]
        steady = sum(r["rows"] for r in done[1:]) / span if len(done) > 1 and span > 0 else None
        peaks = [r["gpu_peak_gib"] for r in done if r.get("gpu_peak_gib") is not None]
        totals = [r["gpu_total_gib"] for r in done if r.get("gpu_total_gib") is not None]
        summary[actor] = {
            "shards": len(done),
            "rows": sum(r["rows"] for r in done),
            "steady_images_per_s": round(steady, 2) if steady is not None else None,
            "gpu_peak_gib": max(peaks) if peaks else None,
            "gpu_total_gib": max(totals) if totals else None,
            # "mps" or "time-sliced" where copies share a GPU (vlm_ray.infer.gpu_sharing)
            "gpu_sharing": done[-1].get("gpu_sharing"),
        }
    return summary


# Of a GPU's memory, what copies may plan to use: another process's CUDA context and the
# allocator's fragmentation take the rest.
USABLE_SHARE = 0.9


def more_copies_hint(summary: dict[str, dict[str, Any]], actors_per_gpu: int) -> str | None:
    """A sentence for the log when one model copy per GPU left room for another (by every
    actor's memory peak), None otherwise: inference run 15 measured two copies 1.22x one.
    Copies that already share a GPU (by infer.actors_per_gpu, or a fractional
    ray.num_gpus_per_worker, which each actor records as gpu_sharing) get no hint."""
    if actors_per_gpu != 1 or not summary:
        return None
    if any(a.get("gpu_sharing") for a in summary.values()):
        return None
    fits = []
    for a in summary.values():
        if not a.get("gpu_peak_gib") or not a.get("gpu_total_gib"):
            return None
        fits.append(int(a["gpu_total_gib"] * USABLE_SHARE // a["gpu_peak_gib"]))
    if min(fits) < 2:
        return None
    peak = max(a["gpu_peak_gib"] for a in summary.values())
    totals = sorted({a["gpu_total_gib"] for a in summary.values()})
    where = (
        f"each actor peaked at {peak} of its GPU's {totals[0]} GiB"
        if len(totals) == 1  # one kind of GPU
        else f"the actors peaked at up to {peak} GiB on GPUs of {totals[0]} to {totals[-1]} GiB"
    )
    return (
        f"{where}: infer.actors_per_gpu: 2 would fit, and two copies sharing a GPU ran 1.22x "
        "one on an H100 (2B model, docs/benchmarks.md, inference run 15), 1.06x more through "
        "an NVIDIA MPS daemon (run 16, docs/deploy.md)"
    )


def pool_steady_rate(summary: dict[str, dict[str, Any]]) -> float | None:
    """The pool's steady images/s: its actors' steady rates summed (None if no actor has one)."""
    rates = [a["steady_images_per_s"] for a in summary.values() if a["steady_images_per_s"]]
    return round(sum(rates), 2) if rates else None


def shared_window_rate(records: list[dict[str, Any]]) -> float | None:
    """Images/s once every actor is warm: rows committed after the last actor's first shard,
    over the time from then to the last commit (None if no commit follows it).

    For actors that share one GPU (infer.actors_per_gpu above 1), summing their own rates
    would count the time one ran alone, while another was still loading or compiling, at the
    speed of the whole GPU.
    """
    by_actor = _by_actor(records)
    if not by_actor:
        return None
    start = max(done[0]["committed_at"] for done in by_actor.values())
    later = [r for r in records if r["committed_at"] > start]
    if not later:
        return None
    span = max(r["committed_at"] for r in later) - start
    return round(sum(r["rows"] for r in later) / span, 2)
