"""A pool's throughput per actor, from the shard ledger: each actor's first shard (model load,
compilation) is left out of its steady rate, and the pool's steady rate sums its actors'."""

from __future__ import annotations

from vlm_ray.infer.throughput import (
    actor_summary,
    more_copies_hint,
    pool_steady_rate,
    shared_window_rate,
)

NO_GPU = {"gpu_peak_gib": None, "gpu_total_gib": None, "gpu_sharing": None}


def _commit(node: str, pid: int, rows: int, at: float) -> dict:
    return {"node": node, "pid": pid, "rows": rows, "committed_at": at}


def test_each_actor_is_timed_from_its_own_first_shard_and_the_pool_sums_them():
    records = [
        _commit("gpu-a", 7, 256, 100.0),  # actor A's first shard: its warm-up, not timed
        _commit("gpu-a", 7, 256, 102.0),
        _commit("gpu-a", 7, 256, 104.0),
        _commit("gpu-b", 7, 256, 110.0),  # same pid on another node: another actor, started late
        _commit("gpu-b", 7, 256, 114.0),
    ]
    summary = actor_summary(records)
    # A: 512 rows / 4 s after its first shard; B: 256 rows / 4 s
    assert summary == {
        "gpu-a:7": {"shards": 3, "rows": 768, "steady_images_per_s": 128.0, **NO_GPU},
        "gpu-b:7": {"shards": 2, "rows": 512, "steady_images_per_s": 64.0, **NO_GPU},
    }
    # one window from the earliest first shard would give (3 * 256) / 14 s = 54.9 images/s
    assert pool_steady_rate(summary) == 192.0


def test_an_actor_with_one_shard_has_no_steady_rate_and_records_without_a_node_use_the_pid():
    summary = actor_summary([_commit("", 41, 8, 5.0), {"pid": 42, "rows": 8, "committed_at": 6.0}])
    assert summary == {
        "41": {"shards": 1, "rows": 8, "steady_images_per_s": None, **NO_GPU},
        "42": {"shards": 1, "rows": 8, "steady_images_per_s": None, **NO_GPU},
    }
    assert pool_steady_rate(summary) is None


def test_actors_sharing_a_gpu_are_timed_together_once_the_last_one_is_warm():
    records = [
        _commit("gpu", 1, 256, 10.0),  # actor 1 warm first, then alone on the GPU for a while
        _commit("gpu", 1, 256, 11.0),
        _commit("gpu", 1, 256, 12.0),
        _commit("gpu", 2, 256, 12.5),  # actor 2's first shard: from here both share the GPU
        _commit("gpu", 1, 256, 14.5),
        _commit("gpu", 2, 256, 16.5),
    ]
    # 512 rows after t=12.5, over 4 s; the per-actor sum would say 768 / 4.5 + 256 / 4 = 234.7
    assert shared_window_rate(records) == 128.0
    assert shared_window_rate(records[:4]) is None  # nothing committed after the last first shard
    assert shared_window_rate([]) is None


def _on_gpu(pid: int, at: float, peak: float | None, total: float | None = 79.19) -> dict:
    return {**_commit("gpu", pid, 512, at), "gpu_peak_gib": peak, "gpu_total_gib": total}


def test_an_actor_s_gpu_memory_peak_is_the_largest_its_shards_reported():
    records = [
        _on_gpu(1, 10.0, 24.1),
        _on_gpu(1, 13.0, 24.9),  # a longer prompt, a larger cache
        _on_gpu(1, 16.0, 24.9),
        _on_gpu(2, 11.0, None, None),  # a CPU actor: nothing to report
    ]
    summary = actor_summary(records)
    assert (summary["gpu:1"]["gpu_peak_gib"], summary["gpu:1"]["gpu_total_gib"]) == (24.9, 79.19)
    assert summary["gpu:2"]["gpu_peak_gib"] is None


def test_a_lone_copy_that_left_room_for_another_on_its_gpu_says_so():
    roomy = actor_summary([_on_gpu(1, 10.0, 24.9), _on_gpu(2, 11.0, 30.2)])
    hint = more_copies_hint(roomy, actors_per_gpu=1)
    assert hint is not None
    assert hint.startswith("each actor peaked at 30.2 of its GPU's 79.19 GiB")
    assert "infer.actors_per_gpu: 2" in hint

    # no hint: a copy too big for two in 90% of the GPU, copies already shared, or no GPU
    assert more_copies_hint(actor_summary([_on_gpu(1, 10.0, 36.0)]), actors_per_gpu=1) is None
    assert more_copies_hint(roomy, actors_per_gpu=2) is None
    assert more_copies_hint(actor_summary([_on_gpu(1, 10.0, None, None)]), 1) is None
    assert more_copies_hint({}, 1) is None
    # copies given half a GPU each by ray.num_gpus_per_worker: 0.5 already share one
    halves = actor_summary([{**_on_gpu(1, 10.0, 24.9), "gpu_sharing": "time-sliced"}])
    assert more_copies_hint(halves, actors_per_gpu=1) is None


def test_on_gpus_of_different_sizes_the_hint_gives_their_range_not_one_size():
    mixed = actor_summary([_on_gpu(1, 10.0, 24.9, 79.19), _on_gpu(2, 11.0, 30.2, 139.8)])
    hint = more_copies_hint(mixed, actors_per_gpu=1)
    assert hint is not None
    assert hint.startswith("the actors peaked at up to 30.2 GiB on GPUs of 79.19 to 139.8 GiB")
