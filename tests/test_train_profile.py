"""train.profile_steps: a real run profiles a window of its own optimiser steps and says where the time went."""

from __future__ import annotations

import pytest

from vlm_ray import layout
from vlm_ray.storage import LocalStore
from vlm_ray.train.settings_guard import training_settings

TRAIN = {
    "engine": "hf",
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_steps": 4,
    "save_steps": 100,
    "warmup_steps": 0,
}


@pytest.fixture
def profiled_run(tiny_training_run):
    """profiled_run(start, steps) -> (store, result): 4 training steps with that profile window."""

    def run(start: int, steps: int):
        return tiny_training_run(8, {**TRAIN, "profile_start_step": start, "profile_steps": steps})

    return run


def test_the_window_after_the_warm_up_steps_is_profiled_and_the_run_still_finishes(profiled_run):
    store, result = profiled_run(start=1, steps=2)

    assert result["global_step"] == 4
    summary = store.read_json(f"{layout.TRAIN_PROFILE}/summary.json")
    # step 2 warms the profiler up; steps 3 and 4 of 4 are profiled
    assert summary["first_step"] == 3 and summary["steps"] == 2
    assert summary["step_ms"] > 0 and summary["device"] == "cpu"
    assert "gpu_busy_ms_per_step" not in summary  # nothing to say about a GPU on CPU
    table = store.read_text(f"{layout.TRAIN_PROFILE}/by_self_cpu_time.txt")
    assert "aten::mm" in table or "aten::addmm" in table  # the model's matmuls were recorded
    assert store.exists(f"{layout.TRAIN_PROFILE}/by_cpu_time.txt")
    assert not store.exists(f"{layout.TRAIN_PROFILE}/by_gpu_time.txt")


def test_a_run_that_ends_inside_the_window_keeps_the_steps_it_profiled(profiled_run):
    store, _ = profiled_run(start=2, steps=10)

    summary = store.read_json(f"{layout.TRAIN_PROFILE}/summary.json")
    assert summary["first_step"] == 4 and summary["steps"] == 1  # step 3 warmed the profiler up


def test_profiling_is_off_by_default_and_does_not_change_what_the_run_trains(
    tiny_qwen2_vl, tiny_train_spec, tmp_path
):
    store = LocalStore(tmp_path / "run")
    plain = tiny_train_spec(tiny_qwen2_vl, tmp_path / "run", train=TRAIN)
    profiled = tiny_train_spec(tiny_qwen2_vl, tmp_path / "run", train={**TRAIN, "profile_steps": 3})
    assert plain.train.profile_steps == 0
    # Turning it on for a re-run of the same run is not a change of training settings.
    assert training_settings(plain, store) == training_settings(profiled, store)


@pytest.mark.gpu
def test_on_a_gpu_the_summary_says_how_busy_the_gpu_was_and_how_many_kernels_ran(profiled_run):
    store, _ = profiled_run(start=1, steps=2)

    summary = store.read_json(f"{layout.TRAIN_PROFILE}/summary.json")
    assert summary["device"] != "cpu" and summary["steps"] == 2
    assert 0 < summary["gpu_busy_ms_per_step"] < summary["step_ms"]
    assert summary["gpu_busy_share"] == pytest.approx(
        summary["gpu_busy_ms_per_step"] / summary["step_ms"], abs=1e-3
    )
    assert summary["kernel_launches_per_step"] > 0
    assert "Self CUDA" in store.read_text(f"{layout.TRAIN_PROFILE}/by_gpu_time.txt")
