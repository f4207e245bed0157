"""bench/memory_sites.py says what GPU memory holds at a step's peak (used on the GPU)."""

from __future__ import annotations

import torch

from bench.memory_sites import parameter_bytes, peak_live_sites


def _entry(action: str, addr: int, size: int, func: str = "f") -> dict:
    frames = [{"filename": "/site-packages/pkg/layer.py", "line": 7, "name": func}]
    return {"action": action, "addr": addr, "size": size, "frames": frames}


def test_the_peak_is_the_highest_live_total_and_its_blocks_are_summed_by_call_site():
    trace = [
        _entry("alloc", 1, 100, "saved_activation"),
        _entry("alloc", 2, 100, "saved_activation"),
        _entry("alloc", 3, 50, "scratch"),
        _entry("free_requested", 3, 50, "scratch"),
        _entry("free_completed", 3, 50, "scratch"),  # counted once, at the request
        _entry("alloc", 4, 70, "loss_buffer"),  # peak: 100 + 100 + 70
        _entry("free_requested", 1, 100),
        _entry("free_requested", 2, 100),
        _entry("alloc", 5, 200, "optimizer"),  # 270 again, not above the peak
        _entry("free_requested", 99, 1000),  # a block from before recording: ignored
        _entry("segment_alloc", 6, 4096),  # segments are reserved memory, not allocations
    ]

    peak = peak_live_sites(trace, depth=1)

    assert peak["peak_bytes"] == 270
    assert dict(peak["sites"]) == {"layer.py:7 saved_activation": 200, "layer.py:7 loss_buffer": 70}


def test_parameters_are_counted_by_the_first_matching_part_and_trainable_ones_apart():
    model = torch.nn.ModuleDict(
        {
            "visual": torch.nn.Linear(4, 4, bias=False),  # 16 float32 = 64 bytes
            "embed_tokens": torch.nn.Embedding(10, 4).to(torch.bfloat16),  # 40 bf16 = 80
            "layer": torch.nn.Linear(2, 2, bias=False),  # 4 float32 = 16
        }
    )
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("layer"))

    out = parameter_bytes(model, {"vision": "visual", "embed": "embed_tokens"})

    assert dict(out) == {"vision": 64, "embed": 80, "trainable": 16}
