"""bench/lora_add_fidelity.py measures how close each LoRA add's output and gradients come to
float32, eager and compiled, in a decoder MLP with LoRA on gate, up and down; on CPU (scaled
down, real Inductor) both adds stay within bf16 rounding of float32, the first step's A
gradients are exactly zero (B is zero), and the eager in-place add is Unsloth's add bit for bit.
"""

from __future__ import annotations

import json

from bench.lora_add_fidelity import TENSORS, WAYS, main

BF16_ROUNDING = 0.02  # bf16 keeps 8 bits: ~0.4% per rounding, a few roundings deep


def test_both_adds_compile_to_within_bf16_rounding_of_float32(tmp_path):
    out = tmp_path / "rows.jsonl"

    rows = main(["--device", "cpu", "--batch", "1", "--scale", "64", "--out", str(out)])

    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert [(r["B"].split()[1], r["way"]) for r in rows] == [
        (state, way) for state in ("zero", "random") for way in WAYS
    ]
    for r in rows:
        for t in TENSORS:
            if r["B"].startswith("B zero") and t.startswith("A_"):
                assert r[t] == 0.0, (r["way"], t)  # B = 0: no gradient reaches A
            else:
                assert 0 < r[t] < BF16_ROUNDING, (r["B"], r["way"], t, r[t])
    eager = {(r["B"], r["way"]): r for r in rows if r["way"].endswith("eager")}
    for state in {r["B"] for r in rows}:
        unsloth, ours = eager[(state, "unsloth_eager")], eager[(state, "ours_eager")]
        assert [unsloth[t] for t in TENSORS] == [ours[t] for t in TENSORS]
