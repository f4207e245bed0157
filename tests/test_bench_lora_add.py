"""bench/lora_add.py prices train.lora_add_without_copy against Unsloth's LoRA add per 7B linear
shape, eager and compiled; on CPU (scaled down) it checks every way is timed, that Inductor's
forward for Unsloth's add calls the copying addmm and ours does not, for the language model's
3-D tokens and the vision tower's 2-D patches, and that the step total weights the shapes by use.
"""

from __future__ import annotations

import json

import pytest

from bench.lora_add import WAYS, main


def test_inductor_makes_no_addmm_of_our_add_and_every_way_is_timed(tmp_path):
    out = tmp_path / "rows.jsonl"

    rows = main(
        [
            *("--device", "cpu", "--batch", "1", "--scale", "32", "--iters", "1"),
            *("--shapes", "language q/o", "vision proj", "--out", str(out)),
        ]
    )

    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    shapes, total = rows[:-1], rows[-1]
    assert [r["row"] for r in shapes] == ["language q/o", "vision proj"]
    assert all(r[f"{w}_ms"] > 0 for r in shapes for w in WAYS)
    for r in shapes:
        assert r["addmm_in_unsloth_compiled"] is True, r["row"]
        assert r["addmm_in_ours_compiled"] is False, r["row"]
    for w in WAYS:
        by_use = sum(r[f"{w}_ms"] * r["per_step"] for r in shapes)
        assert total[f"{w}_ms"] == pytest.approx(by_use, rel=1e-2, abs=0.1)
    assert total["speedup_compiled"] == pytest.approx(
        total["unsloth_compiled_ms"] / total["ours_compiled_ms"], rel=1e-2
    )
