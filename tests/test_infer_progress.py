"""The infer pool's progress line: images/s overall and recently, and the time left at the recent rate."""

from __future__ import annotations

from vlm_ray.durations import rough_duration
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
        f"({100 / (2 * every):.2f} recently), {rough_duration(9 * 2 * every)} left"
    )

    clock.now += 1.0
    assert progress.add({"rows": 100, "errors": 0}) is None, "not before the interval is over"

    clock.now += every - 1.0
    line = progress.add({"rows": 100, "errors": 0})
    # 200 images in the last interval: 7 shards of ~100 left at that rate.
    recent = 200 / every
    assert f"3/10 shards, 300 images (1 errors), {300 / (3 * every):.2f} images/s" in line
    assert line.endswith(f"({recent:.2f} recently), {rough_duration(700 / recent)} left")


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
    assert rough_duration(40) == "~40 s"
    assert rough_duration(12 * 60) == "~12 min"
    assert rough_duration(3.5 * 3600) == "~3.5 h"


def test_while_nothing_finishes_a_line_a_minute_says_what_the_first_batches_compile():
    clock = Clock()
    progress = _Progress("base", total=4, clock=clock, compiling="the vision blocks")
    quiet = pool.QUIET_LINE_EVERY_S

    clock.now += quiet - 1
    assert progress.waiting(in_flight=2) is None, "not before a quiet minute"
    clock.now += 1
    assert progress.waiting(in_flight=2) == (
        f"infer[base]: 0/4 shards done, 2 in flight, none finished in the last "
        f"{rough_duration(quiet)}; each actor's first batch compiles the vision blocks: "
        "minutes, not a hang"
    )
    clock.now += 1
    assert progress.waiting(in_flight=2) is None, "one line per quiet interval"

    progress.add({"rows": 4, "errors": 0})
    clock.now += quiet
    line = progress.waiting(in_flight=2)
    assert line.startswith("infer[base]: 1/4 shards done") and "compiles" not in line


def test_the_compile_note_names_each_opt_in_setting_that_compiles(tmp_path):
    from test_infer_loading import infer_spec

    assert pool.compile_note(infer_spec(str(tmp_path), "m")) == ""
    spec = infer_spec(
        str(tmp_path),
        "m",
        generation={"cache_implementation": "static"},
        infer={"compile_vision": True, "fp8": "vision"},
    )
    assert pool.compile_note(spec) == (
        "the static-cache decoding step, the vision blocks, float8 layers (infer.fp8=vision)"
    )
