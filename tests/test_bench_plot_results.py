"""bench/plot_results.py: every bar and point comes from the result files, median markers included."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench.plot_results import hold_bests, infer_bars, main, split_curves, train_bars


def _train_json(tmp_path):
    path = tmp_path / "train_7b.json"
    results = {
        "hf[bs4]": {"samples_per_s": 3.5, "median_step_ms": 800.0, "peak_gib": 17.18},
        "stage[bs4,graphs]": {"samples_per_s": 8.0, "peak_gib": 10.1},  # no median: no marker
    }
    path.write_text(json.dumps({"invocations": [{"gpu": "H100", "batch": 4, "results": results}]}))
    return path


def test_training_bars_carry_the_rate_the_memory_and_the_rate_by_the_median_step(tmp_path):
    labels, speed, memory, gpu, by_median = train_bars(_train_json(tmp_path))
    assert speed == [3.5, 8.0] and memory == [17.18, 10.1] and gpu == "H100"
    assert by_median == [5.0, None]  # 4 samples / 0.8 s
    assert labels[0].startswith("(a) HF") and "[bs4,graphs]" in labels[1]


def test_inference_bars_read_each_modes_own_rate(tmp_path):
    path = tmp_path / "infer_2b.jsonl"
    records = [
        {"mode": "b", "best_batch": 512, "images_per_s": 70.0},
        {"mode": "s", "batch": 512, "predict_table_images_per_s": 140.0, "fp8": "vision"},
        {"mode": "c", "gpus": 1, "batch": 512, "images_per_s": 160.0},
        # two actors on one GPU: the rate once both were warm, not the sum of their own
        {
            "mode": "c",
            "gpus": 1,
            "gpus_per_actor": 0.5,
            "actors": 2,
            "batch": 512,
            "images_per_s": 250.0,
            "images_per_s_all_warm": 180.0,
        },
        # three copies per GPU through infer.actors_per_gpu, with the language model compiled
        {
            "mode": "c",
            "gpus": 1,
            "actors_per_gpu": 3,
            "actors": 3,
            "batch": 384,
            "images_per_s": 240.0,
            "images_per_s_all_warm": 205.0,
            "compile_language": True,
            "defer_stop_check": True,
        },
        # two copies through an MPS daemon, the language model in float8 too
        {
            "mode": "c",
            "gpus": 1,
            "actors_per_gpu": 2,
            "actors": 2,
            "batch": 512,
            "images_per_s": 254.6,
            "images_per_s_all_warm": 256.6,
            "fp8": "all",
            "gpu_sharing_by_actor": {"vm:1": "mps", "vm:2": "mps"},
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    labels, speed, _ = infer_bars([path])
    assert speed == [70.0, 140.0, 160.0, 180.0, 205.0, 256.6]
    assert "one process" in labels[1] and "fp8 vision" in labels[1]
    assert "2 actors" in labels[3]
    assert "3 actors" in labels[4] and "compiled LM" in labels[4] and "deferred stop" in labels[4]
    assert "compiled LM" not in labels[3]
    assert "2 actors (mps)" in labels[5] and "fp8 all" in labels[5]
    assert "(mps)" not in labels[3]  # no record of how those shared


def _split_jsonl(tmp_path):
    path = tmp_path / "lora_add_split_2b.jsonl"
    rows = [
        {"seed": 0, "way": "fp32_eager", "losses": [7.0, 6.5, 6.0], "size": "2b", "device": "H100"},
        {"seed": 0, "way": "unsloth_compiled", "losses": [7.0, 6.75, 6.25]},
        {"seed": 0, "way": "ours_compiled", "losses": [7.0, 6.5, 6.125]},
        # a seed whose float32 reference is missing (a cut run) has nothing to be drawn against
        {"seed": 1, "way": "ours_compiled", "losses": [6.0, 5.0, 4.0]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_split_curves_are_each_ways_loss_minus_float32s_per_seed(tmp_path):
    curves, size, device = split_curves([_split_jsonl(tmp_path)])
    assert list(curves) == [0]
    assert curves[0]["fp32_eager"] == [0.0, 0.0, 0.0]
    assert curves[0]["unsloth_compiled"] == [0.0, 0.25, 0.25]
    assert curves[0]["ours_compiled"] == [0.0, 0.0, 0.125]
    assert (size, device) == ("2b", "H100")


@pytest.mark.parametrize(("kind", "results"), [("train", _train_json), ("split", _split_jsonl)])
def test_the_chart_is_written(tmp_path, monkeypatch, kind, results):
    out = tmp_path / f"{kind}.png"
    monkeypatch.setattr(sys, "argv", ["plot_results", kind, str(results(tmp_path)), str(out)])
    main()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_holds_pair_our_fastest_row_with_hf_s_fastest_hold_by_hold(tmp_path, monkeypatch):
    for hold, results in {
        "a": {"hf[bs64]": {"samples_per_s": 11.0}, "stage[x]": {"samples_per_s": 33.0}},
        "b": {"stage[x]": {"samples_per_s": 34.0}, "stage[y]": {"samples_per_s": 32.0}},
    }.items():
        inv = {"shape": "7b", "gpu": "H100\nmore", "batch": 32, "image": 448, "results": results}
        (tmp_path / hold).mkdir()
        (tmp_path / hold / "train_7b.json").write_text(json.dumps({"invocations": [inv]}))
    holds = [f"hold {h}={tmp_path}/{h}/*.json" for h in "ab"]

    # hold b ran no HF line: its target is unknown, not zero
    assert hold_bests(holds) == [("hold a", 33.0, 11.0, "H100"), ("hold b", 34.0, None, "H100")]
    with pytest.raises(SystemExit, match="NAME=GLOB"):
        hold_bests([f"{tmp_path}/a/*.json"])

    out = tmp_path / "holds.png"
    monkeypatch.setattr(sys, "argv", ["plot_results", "holds", *holds, str(out)])
    main()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_holds_chart_in_docs_reads_the_ratios_docs_benchmarks_quotes():
    root = Path(__file__).resolve().parents[1] / "bench" / "results" / "train"
    holds = {
        "run 24": "run24*",
        "run 25": "run25*",
        "run 26": "run26[bc]",
        "run 27": "run27[abd]",
        "run 29": "run29d",
        "run 30": "run30a",
    }
    bests = hold_bests([f"{name}={root}/{glob}/r/train_7b.json" for name, glob in holds.items()])

    ratios = {name: round(ours / hf, 2) if hf else None for name, ours, hf, _ in bests}
    # run 25's fastest row of ours is the vision-widths one (2.97x); run 29 ran no HF line;
    # run 30 is the first hold at or above the line
    assert ratios == {
        "run 24": 2.82,
        "run 25": 2.97,
        "run 26": 2.74,
        "run 27": 2.73,
        "run 29": None,
        "run 30": 3.05,
    }
