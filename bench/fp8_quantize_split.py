"""What the float8 quantizing of down's input costs as Inductor fuses it, and split in two.

Why: training run 27's profile (7B, batch 32, train.fp8) put the two largest fused kernels at 32
and 31 ms per step, 28 calls each, ~1.1 ms per call: Inductor's reductions that quantize an
18,944-wide row per token for a float8 GEMM, fused with what produces the row (the forward's
SiLU(gate) times up, with LoRA's products added; the backward's silu_backward). A row of 18,944
is too long for a persistent reduction, so the fused kernel loops over it twice: once for the
row's amax, once to scale and cast, and computes the row from its inputs both times, reading
every input twice. Split in two, the first kernel makes the row once (it is kept for the
backward anyway: LoRA's A gradient of down needs it) with its amax, and the second reads only the
row. This prices both at the 7B shape, forward:

- "h only": h = SiLU(gate + gate's LoRA product) * (up + up's LoRA product), compiled, the
  floor (it must be made and stored in any case);
- "fused": h and its per-row float8 quantizing in one compiled function, as train.fp8 gets
  it inside Unsloth's compiled blocks;
- "split": the same with the quantizing behind a custom op Inductor cannot fuse into, so that
  it reads the stored h (the quantizing itself compiled on its own, as quantize_activation
  runs outside a compiled block).

Each row reports ms per call and the bandwidth the minimum traffic implies (the four inputs read
once, h written, the float8 row written).

    python bench/fp8_quantize_split.py --out $R/fp8_quantize_split.jsonl        # GPU, ~1 minute
    python bench/fp8_quantize_split.py --device cpu --scale 64 --iters 2        # CPU: it runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

WAYS = ("h_only", "fused", "split")


def _h(gate, gate_lora, up, up_lora):
    import torch

    return torch.nn.functional.silu(gate + gate_lora) * (up + up_lora)


def _quantize_rows_op() -> Any:
    """torch.ops.vlm_ray_bench.quantize_rows: quantize_pow2 per row to e4m3, opaque to Inductor
    (its implementation is compiled on its own)."""
    import torch

    from vlm_ray.models.fp8_frozen_linear import E4M3, quantize_pow2

    if hasattr(torch.ops.vlm_ray_bench, "quantize_rows"):
        return torch.ops.vlm_ray_bench.quantize_rows
    compiled = torch.compile(quantize_pow2, dynamic=False)

    # the schema spelled out: with `from __future__ import annotations` it cannot be inferred
    @torch.library.custom_op(
        "vlm_ray_bench::quantize_rows", mutates_args=(), schema="(Tensor h) -> (Tensor, Tensor)"
    )
    def quantize_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = compiled(h, E4M3, True)
        return q, scale

    @quantize_rows.register_fake
    def _(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            h.new_empty(h.shape, dtype=E4M3),
            h.new_empty((*h.shape[:-1], 1), dtype=torch.float32),
        )

    return torch.ops.vlm_ray_bench.quantize_rows


def ways() -> dict[str, Any]:
    """The three compiled functions of (gate, gate_lora, up, up_lora)."""
    import torch

    from vlm_ray.models.fp8_frozen_linear import E4M3, quantize_pow2

    quantize_rows = _quantize_rows_op()

    def fused(*inputs):
        h = _h(*inputs)
        q, scale = quantize_pow2(h, E4M3, rowwise=True)
        return h, q, scale

    def split(*inputs):
        h = _h(*inputs)
        q, scale = quantize_rows(h)
        return h, q, scale

    return {
        name: torch.compile(fn, dynamic=False)
        for name, fn in (("h_only", _h), ("fused", fused), ("split", split))
    }


def measure(a: argparse.Namespace) -> list[dict]:
    """One row per way: ms per call, the implied bandwidth; and whether fused and split agree."""
    import torch

    from bench.kernel_rows import wall_ms

    tokens, width = max(8, a.batch * 320 // a.scale), max(64, 18944 // a.scale)
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = [
        (torch.randn(tokens, width, generator=g) * s).to(a.device, torch.bfloat16)
        for s in (1.0, 0.01, 1.0, 0.01)
    ]
    fns = ways()
    outs = {name: fn(*inputs) for name, fn in fns.items()}
    same = bool(
        torch.equal(outs["fused"][1].float(), outs["split"][1].float())
        and torch.equal(outs["fused"][2], outs["split"][2])
    )
    min_bytes = tokens * width * (4 * 2 + 2 + 1)  # four bf16 inputs read, h written, fp8 written
    common = {
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "tokens": tokens,
        "width": width,
        "fused_equals_split": same,
    }
    rows = []
    for name, fn in fns.items():
        ms = wall_ms(lambda fn=fn: fn(*inputs), a.iters, a.device)
        traffic = tokens * width * (4 * 2 + 2) if name == "h_only" else min_bytes
        rows.append(
            {**common, "way": name, "ms": round(ms, 4), "gb_per_s": round(traffic / ms / 1e6, 1)}
        )
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table: ms per call and implied GB/s per way."""
    lines = ["| way | tokens x width | ms per call | GB/s (minimum traffic) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['way']} | {r['tokens']} x {r['width']} | {r['ms']} | {r['gb_per_s']} |")
    lines.append(
        f"\nfused and split give the same float8 rows and scales: {rows[0]['fused_equals_split']}"
    )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This script's own options (--device and --out come from bench.kernel_rows)."""
    p.add_argument("--batch", type=int, default=32, help="samples of 320 tokens")
    p.add_argument("--scale", type=int, default=1, help="divide tokens and width (CPU smoke runs)")
    p.add_argument("--iters", type=int, default=50)


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure, append the rows to --out and print the table (bench.kernel_rows' command line)."""
    from bench.kernel_rows import run_cli

    return run_cli(__doc__, add_arguments, measure, table, argv)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(0 if main() else 1)
