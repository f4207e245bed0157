"""bench/train_hold_ratios.py: a hold's training rows against its fastest HF row, by rate and by
median step, with MFU from the HF row's FLOPs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.train_hold_ratios import markdown, read_rows

REPO = Path(__file__).resolve().parents[1]


def _invocation(batch: int, results: dict) -> dict:
    return {"shape": "7b", "gpu": "NVIDIA H200", "batch": batch, "image": 448, "results": results}


def _hold(tmp_path: Path, invocations: list[dict]) -> list[Path]:
    path = tmp_path / "train_7b.json"
    path.write_text(json.dumps({"invocations": invocations}))
    return [path]


def test_ours_is_judged_against_the_fastest_hf_row_by_rate_and_by_median_step(tmp_path):
    flops = 989e12 / 20  # 20 samples/s would be 100% MFU
    paths = _hold(
        tmp_path,
        [
            _invocation(32, {"hf[bs32]": {"samples_per_s": 8.0, "median_step_ms": 4000.0}}),
            _invocation(
                64,
                {
                    "hf[bs64]": {
                        "samples_per_s": 10.0,  # one slow step: its median pace is faster
                        "median_step_ms": 5000.0,
                        "flops_per_sample": flops,
                    }
                },
            ),
            _invocation(
                32,
                {
                    "stage[fp8]": {
                        "samples_per_s": 16.0,
                        "median_step_ms": 1000.0,
                        "conditions": {"gpu_sm_mhz": {"median": 1740.0, "min": 1575.0}},
                    }
                },
            ),
            _invocation(32, {"stage[broken]": {"error": "out of memory"}}),
        ],
    )
    rows = read_rows(paths)
    assert [r.label for r in rows] == ["hf[bs32]", "hf[bs64]", "stage[fp8]"]
    table = markdown(rows)
    assert "Fastest HF row: hf[bs64] at batch 64, 10 samples/s (12.80 by its median step)" in table
    # 16 / 10 by rate; 32 / 12.8 by medians; MFU 16 / 20; the SM clock's median beside it
    assert "| stage[fp8] | 32 | 16 | 32.00 | None | 80.0% | 1.60 | 2.50 | 1740 |" in table
    assert "| hf[bs32] | 32 | 8 | 8.00 | None | 40.0% | 0.80 | 0.62 | - |" in table  # no record


def test_a_hold_without_an_hf_row_has_no_baseline_unless_one_of_ours_is_named(tmp_path):
    paths = _hold(
        tmp_path,
        [
            _invocation(32, {"stage[x]": {"samples_per_s": 1.0}}),
            _invocation(32, {"stage[y]": {"samples_per_s": 1.5, "median_step_ms": 20000.0}}),
        ],
    )
    rows = read_rows(paths)
    with pytest.raises(SystemExit, match="no HF row"):
        markdown(rows)
    with pytest.raises(SystemExit, match=r"starts with 'stage\[z'.*stage\[x\], stage\[y\]"):
        markdown(rows, baseline="stage[z")

    table = markdown(rows, baseline="stage[x")

    assert "Fastest baseline row: stage[x] at batch 32, 1 samples/s" in table
    assert "| stage[y] | 32 | 1.5 | 1.60 | None | - | 1.50 | - |" in table  # no MFU without HF


def test_training_run_29s_a_b_without_hf_is_read_against_unsloth_s_add():
    paths = [REPO / "bench/results/train/run29d/r/train_7b.json"]

    table = markdown(read_rows(paths), baseline="stage[bs32,16bit,fp8-wide,label-span,w2")

    # train.lora_add_without_copy 1.06x Unsloth's add by rate and by medians, at a 3% higher
    # median SM clock, and the lower loss run 28 put on float32's side
    assert "| 32 | 34.04 | 34.38 | 69.54 | - | 1.06 | 1.06 | 1890 | 9.6413 |" in table
    assert "| 32 | 32.002 | 32.28 | 69.54 | - | 1.00 | 1.00 | 1830 | 9.6946 |" in table


def test_training_run_24s_raw_files_give_the_ratios_docs_benchmarks_quotes():
    paths = sorted(REPO.glob("bench/results/train/run24*/r/train_7b.json"))
    assert len(paths) == 3
    table = markdown(read_rows(paths))
    assert (
        "| stage[bs32,16bit,fp8-wide,w2,gc-vision] | 32 | 34.516 | 34.93 | 69.54 | 64.2% | 2.82 | 2.65 "
        "| 1785 |" in table
    )
    assert (
        "| stage[bs32,16bit,w2,gc-vision] | 32 | 29.616 | 29.90 | 75.26 | 55.1% | 2.42 | 2.27 | 1755 |"
        in table
    )


HOLDS = {
    "run 25": (
        "run25*",
        "Fastest HF row: hf[bs64] at batch 64, 10.694 samples/s (11.52 by its median step)",
        [
            # the default setup; and fc1/fc2 in float8 too, 0.6% faster at a 13% higher clock
            "| 32 | 31.545 | 31.95 | 69.54 | 58.7% | 2.95 | 2.77 | 1740 |",
            "| 32 | 31.741 | 32.24 | 69.15 | 59.0% | 2.97 | 2.80 | 1965 |",
        ],
    ),
    "run 26, second hold": (
        "run26[bc]",
        "Fastest HF row: hf[bs64] at batch 64, 11.782 samples/s (12.21 by its median step)",
        [
            # LoRA's add in place in eager code, then Unsloth's own add: no gain
            "| 32 | 32.127 | 32.40 | 69.54 | 59.8% | 2.73 | 2.65 | 1935 |",
            "| 32 | 32.339 | 32.64 | 69.54 | 60.2% | 2.74 | 2.67 | 1800 |",
        ],
    ),
    "run 27": (
        "run27[abd]",
        "Fastest HF row: hf[bs64] at batch 64, 12.383 samples/s (12.74 by its median step)",
        [
            # train.lora_add_without_copy, then Unsloth's add; then the other order: 1.04x
            # faster, and a different train loss
            "| 32 | 33.772 | 33.97 | 69.54 | 62.8% | 2.73 | 2.67 | 1890 | 9.6356 |",
            "| 32 | 32.452 | 32.65 | 69.54 | 60.4% | 2.62 | 2.56 | 1860 | 9.7034 |",
            "| 32 | 32.514 | 32.71 | 69.54 | 60.5% | 2.63 | 2.57 | 1905 | 9.7043 |",
            "| 32 | 33.759 | 33.98 | 69.54 | 62.8% | 2.73 | 2.67 | 1935 | 9.6383 |",
            "| hf[bs64] | 64 | 12.383 | 12.74 | 33.86 | 23.0% | 1.00 | 1.00 | 1980 | - |",
        ],
    ),
}


@pytest.mark.parametrize("hold", HOLDS)
def test_a_hold_s_raw_files_give_the_ratios_clocks_and_losses_docs_benchmarks_quotes(hold: str):
    pattern, fastest, rows = HOLDS[hold]
    paths = sorted(REPO.glob(f"bench/results/train/{pattern}/r/train_7b.json"))
    assert paths

    table = markdown(read_rows(paths))

    assert fastest in table
    for row in rows:
        assert row in table
