"""bench/train_speed.py's step statistics and table (the GPU runs themselves happen on the device)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import SimpleNamespace

from bench.train_speed import (
    _stop,
    collect_results,
    make_copy_sites,
    make_early_result,
    make_step_losses,
    result_of,
    steady,
    summarise,
)


def test_throughput_is_the_timed_steps_mean_and_the_median_and_max_expose_a_stall():
    # 2 warm-up steps, then nine 2 s steps and one 27 s stall (run 16's batch-64 run).
    times = [30.0, 3.0] + [2.0] * 9 + [27.0]

    r = steady(times, warmup=2, batch=64)

    assert r["timed_steps"] == 10
    assert r["step_ms"] == 4500.0  # (9 * 2 + 27) / 10 s
    assert r["samples_per_s"] == round(64 / 4.5, 3)
    assert r["median_step_ms"] == 2000.0
    assert r["max_step_ms"] == 27000.0
    assert r["first_step_s"] == 30.0
    assert r["short_steps"] == 0


def test_with_the_wall_window_short_intervals_cannot_overstate_the_speed():
    # Run 21: two of ten timed intervals implausibly short while the run paced ~1.1 s per step.
    times = [25.0] + [1.065] * 8 + [0.1, 0.1]
    window = 10 * 1.1  # the wall time from the first timed step's begin to the last one's end

    r = steady(times, warmup=1, batch=32, window_s=window)

    assert r["step_ms"] == 1100.0
    assert r["samples_per_s"] == round(32 / 1.1, 3)
    assert r["short_steps"] == 2
    assert r["median_step_ms"] == 1065.0
    # the intervals' mean alone would have said 26% faster
    assert steady(times, warmup=1, batch=32)["samples_per_s"] > 1.25 * r["samples_per_s"]


def test_an_even_number_of_timed_steps_takes_the_middle_pair_for_the_median():
    r = steady([9.0, 1.0, 3.0, 2.0, 4.0], warmup=1, batch=4)
    assert r["median_step_ms"] == 2500.0
    assert r["max_step_ms"] == 4000.0
    assert r["timed_step_ms"] == [1000.0, 3000.0, 2000.0, 4000.0]  # in step order


def test_a_run_cut_inside_its_warm_up_reports_why_it_has_no_figure():
    assert steady([5.0, 1.0], warmup=8, batch=4) == {"error": "only 2 steps ran, 8 were warm-up"}


def test_the_table_shows_median_and_max_beside_the_mean_and_the_ratio_to_hf():
    results = {
        "hf[bs4]": {
            "samples_per_s": 4.0,
            "step_ms": 1000.0,
            "peak_gib": 17.18,
            "flops_per_sample": 1e12,
        },
        "stage[bs4]": {
            "samples_per_s": 8.0,
            "step_ms": 500.0,
            "median_step_ms": 480.0,
            "max_step_ms": 700.0,
            "peak_gib": 10.23,
        },
    }

    table = summarise(results, "7b", "NVIDIA H200", peak=1e15)

    assert "| stage[bs4] | 8.0 | 500.0 (480.0, 700.0) | 10.23 | 0.8% | 2.00 |" in table
    assert "| hf[bs4] | 4.0 | 1000.0 | 17.18 | 0.4% | 1.00 |" in table


def test_result_lines_are_read_from_the_child_and_from_a_ray_actor_s_forwarded_output():
    assert result_of('RESULT {"samples_per_s": 8.0}\n') == {"samples_per_s": 8.0}
    forwarded = '\x1b[36m(Trainer pid=1279)\x1b[0m RESULT {"samples_per_s": 6.9}\n'
    assert result_of(forwarded) == {"samples_per_s": 6.9}
    assert result_of('(Trainer pid=7, ip=10.0.0.2) RESULT {"a": 1}') == {"a": 1}
    assert result_of("\x1b[36m(Trainer pid=1279)\x1b[0m {'train_runtime': '94.5'}") is None
    assert result_of("100%|██████████| 18/18 [00:59<00:00,  3.32s/it]") is None


def test_the_stage_s_timing_is_printed_as_soon_as_the_timed_steps_are_done(capsys):

    class Report:
        def summary(self):
            return {"checkpointed_layers": "32/60"}

    early = make_early_result(3, lambda: {"samples_per_s": 8.0}, Report())
    for step in (1, 2, 3, 4):
        early.on_step_end(None, SimpleNamespace(global_step=step), None)

    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 1  # once, after step 3
    result = result_of(lines[0])
    assert result["samples_per_s"] == 8.0
    assert result["checkpointed_layers"] == "32/60"
    assert "after step 3" in result["partial"]
    assert "peak_gib" in result


def test_the_stage_keeps_every_logged_step_s_loss_for_comparing_setups_step_by_step():
    losses = make_step_losses()
    for logs in ({"loss": 12.68512}, {"learning_rate": 2e-4}, {"loss": "12.55"}, None):
        losses.on_log(None, None, None, logs=logs)
    losses.on_log(None, None, None, logs={"train_loss": 9.6, "train_runtime": 65.0})

    assert losses.losses == [12.6851, 12.55]  # the end-of-training summary is not a step


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_s_last_result_line_is_its_answer_and_a_child_without_one_is_an_error():
    two = _child('print("noise"); print("RESULT {\\"n\\": 1}"); print("RESULT {\\"n\\": 2}")')
    assert collect_results(two)["n"] == 2

    failed = collect_results(_child("import sys; print('boom'); sys.exit(3)"))
    assert failed["error"] == "exit 3"


def _collect_stopped_after(cmd: list[str], seconds: float) -> dict:
    """collect_results(cmd) in a driver that SIGTERM reaches after `seconds`, as `timeout` does."""
    previous = signal.signal(signal.SIGTERM, _stop)
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        return collect_results(cmd)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)


def test_a_driver_stopped_by_sigterm_keeps_the_timing_printed_before_the_cut_and_stops_the_child():
    # The child prints its timing, then "saves" for a long time, as the stage does.
    slow = _child(
        'import time; print("RESULT {\\"samples_per_s\\": 8.0}", flush=True); time.sleep(60)'
    )
    started = time.time()

    result = _collect_stopped_after(slow, 3.0)

    assert result["samples_per_s"] == 8.0
    assert result["cut"].startswith("stopped by SIGTERM")
    assert time.time() - started < 30  # the child did not run out its 60 s


def test_a_stopped_driver_answers_well_inside_the_chains_kill_grace_even_if_the_child_lingers():
    # A child that ignores SIGTERM, as a Ray driver shutting down can for a while: the driver
    # must still return its record before `timeout -k 5` kills it (device_chains.sh).
    lingering = _child(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        'print("RESULT {\\"samples_per_s\\": 8.0}", flush=True); time.sleep(60)'
    )
    started = time.time()

    result = _collect_stopped_after(lingering, 2.0)

    assert result["samples_per_s"] == 8.0 and result["cut"].startswith("stopped by SIGTERM")
    assert time.time() - started < 2.0 + 4.5


def test_a_driver_stopped_before_any_result_says_so_and_is_marked_cut():
    result = _collect_stopped_after(_child("import time; time.sleep(60)"), 2.0)

    assert result["error"] == "no RESULT line before the cut"
    assert result["cut"].startswith("stopped by SIGTERM")


def test_the_copy_sites_step_also_reports_gpu_time_by_launcher_for_the_names_asked(tmp_path):
    import torch

    sites = make_copy_sites(0, tmp_path / "trace.json", ("Memcpy DtoD",))
    state = SimpleNamespace(global_step=0)
    sites.on_step_begin(None, state, None)
    torch.randn(8, 8) @ torch.randn(8, 8)
    state.global_step = 1
    sites.on_step_end(None, state, None)

    summary = sites.summary()
    assert summary["copy_step"] == 0 and (tmp_path / "trace.json").is_file()
    assert summary["gpu_time_patterns"] == ["Memcpy DtoD"]
    assert summary["gpu_time_sites"] == {}  # a CPU-only step launches nothing on a GPU
    assert "gpu_time_sites" not in make_copy_sites(0, tmp_path / "t2.json").summary()
