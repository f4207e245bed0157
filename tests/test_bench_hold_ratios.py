"""bench/hold_ratios.py: a hold's setups against its fastest plain-HF call and each of them."""

from __future__ import annotations

import json

import pytest

from bench.hold_ratios import hold_ratios, markdown


def _hold(tmp_path, records):
    path = tmp_path / "infer_2b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return [path]


POOL = {"mode": "c", "gpus": 1, "actors_per_gpu": 2, "actors": 2, "batch": 512, "fp8": "all"}


def test_each_setup_is_divided_by_the_fastest_baseline_and_by_each(tmp_path):
    paths = _hold(
        tmp_path,
        [
            {"mode": "b", "best_batch": 512, "images_per_s": 70.0},
            # a shared pool's rate is the window once both actors were warm, not their sum
            {**POOL, "images_per_s": 260.0, "images_per_s_all_warm": 210.0},
            {"mode": "b", "best_batch": 512, "images_per_s": 60.0},
        ],
    )
    baselines, setups = hold_ratios(paths)
    assert baselines == [70.0, 60.0]
    [(label, rate, ratios)] = setups
    assert rate == 210.0 and ratios == [3.0, 3.5]
    table = markdown(baselines, setups)
    # judged against the fastest call (70), so the slow one (60) cannot meet a 3x target alone
    assert "× fastest HF (70)" in table and "| 210 | 3.00 | 3.00 / 3.50 |" in table
    assert "fp8 all" in label and "\n" not in label


def test_files_without_a_plain_hf_line_have_no_baseline(tmp_path):
    paths = _hold(tmp_path, [{**POOL, "images_per_s": 200.0, "images_per_s_all_warm": 200.0}])
    with pytest.raises(SystemExit, match="no plain-HF line"):
        markdown(*hold_ratios(paths))
