"""The infer pool's progress line: images/s overall and recently, and the time left at the recent rate."""

from __future__ import annotations

from vlm_ray.infer import pool
from vlm_ray.infer.pool import _Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_interval_with_the_recent_rate_and_the_time_left():
    clock = Clock()
    progress = _Progress("finetuned", total=10, clock=clock)
    every = pool.PROGRESS_EVERY_S

    clock.now += 2 * every  # the first shard took loading and compilation
    first = progress.add({"rows": 100, "errors": 1})
    assert first == (
        f"infer[finetuned]: 1/10 shards, 100 images (1 errors), {100 / (2 * every):.2f} images/s "
        f"({100 / (2 * every):.2f} recently), {pool._duration(9 * 2 * every)} left"
    )

    clock.now += 1.0
    assert progress.add({"rows": 100, "errors": 0}) is None, "not before the interval is over"

    clock.now += every - 1.0
    line = progress.add({"rows": 100, "errors": 0})
    # 200 images in the last interval: 7 shards of ~100 left at that rate.
    recent = 200 / every
    assert f"3/10 shards, 300 images (1 errors), {300 / (3 * every):.2f} images/s" in line
    assert line.endswith(f"({recent:.2f} recently), {pool._duration(700 / recent)} left")


def test_the_last_shard_always_logs_and_has_no_time_left():
    clock = Clock()
    progress = _Progress("base", total=2, clock=clock)
    clock.now += 1.0
    assert progress.add({"rows": 5, "errors": 0}) is None
    clock.now += 1.0
    assert progress.add({"rows": 5, "errors": 0}) == (
        "infer[base]: 2/2 shards, 10 images (0 errors), 5.00 images/s"
    )


def test_time_left_reads_in_the_unit_a_person_would_use():
    assert pool._duration(40) == "~40 s"
    assert pool._duration(12 * 60) == "~12 min"
    assert pool._duration(3.5 * 3600) == "~3.5 h"
