"""bench/lora_overhead.py prices CUDA graphs on a stack of LoRA layers (on the GPU); on CPU it
must build the stack, train through it and say why it has no graph row."""

from __future__ import annotations

import json

from bench.lora_overhead import build_stack, main


def test_the_stack_carries_a_trainable_lora_adapter_on_every_layer_and_a_frozen_base():
    stack = build_stack(layers=3, width=32, rank=4, base="bf16", device="cpu")

    trainable = {n for n, p in stack.named_parameters() if p.requires_grad}
    assert len(trainable) == 3 * 2  # lora_A and lora_B per layer
    assert all("lora_" in n for n in trainable)
    assert sum(1 for n, _ in stack.named_parameters() if "base_layer" in n) == 3


def test_on_cpu_the_eager_row_is_timed_and_the_graph_rows_say_they_need_cuda(tmp_path):
    out = tmp_path / "rows.jsonl"
    argv = ["--device", "cpu", "--bases", "bf16", "--layers", "3", "--width", "32"]

    rows = main([*argv, "--tokens", "16", "--iters", "2", "--out", str(out)])

    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    eager, *graphs = rows
    assert [r["variant"] for r in rows] == [
        "eager",
        "cuda-graph",
        "graph per layer",
        "graphs in one pool",
    ]
    assert eager["wall_ms"] > 0 and eager["layers"] == 3 and eager["tokens"] == 16
    assert all(g["error"] == "CUDA graphs need a CUDA device" for g in graphs)
