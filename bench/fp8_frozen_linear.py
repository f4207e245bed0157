"""What train.fp8 buys per step: the frozen base layers' GEMMs of a LoRA step in bf16 and in
float8, side by side, at the 7B shape and a large batch (where the step is GPU-bound).

One row per distinct linear shape of Qwen2-VL-7B (language: q, k/v, o, gate/up, down; vision
tower: qkv, proj, fc1, fc2), each timed as the step runs it: the forward (with
use_gradient_checkpointing it runs twice; the bench counts it once) and the gradient with
respect to the input (no weight gradient: the weight is frozen). "bf16" is nn.Linear as PEFT's
base layer runs it; "fp8 row" and "fp8 tensor" are vlm_ray's Float8FrozenLinear with per-token
and per-tensor activation scales (train.fp8_scaling), their quantization included. A last row adds the shapes up by how often a step runs them
(28 language layers, 32 vision blocks), the part of the step this setting can change.

    python bench/fp8_frozen_linear.py --out $R/fp8_frozen_linear.jsonl     # GPU, ~1 minute
    python bench/fp8_frozen_linear.py --device cpu --batch 1 --scale 16     # CPU: checks it runs

--scale divides every dimension (CPU smoke runs); the figures that mean something are CUDA ones
at --scale 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _step(layer, x, grad):
    def run():
        x.grad = None
        layer(x).backward(grad)

    return run


def measure(a: argparse.Namespace) -> list[dict]:
    """One row per shape (bf16 and both float8 scalings: ms and ratios) and the step total."""
    import torch

    from bench.kernel_rows import LINEAR_SHAPES_7B, measured_on, shape_fields, wall_ms
    from vlm_ray.models.fp8_frozen_linear import Float8FrozenLinear

    device = a.device
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        return [{"row": "all", "error": "float8 GEMMs need compute capability 8.9+"}]
    common = {
        "batch": a.batch,
        "scale": a.scale,
        **measured_on(device),
    }
    torch.manual_seed(0)
    rows: list[dict] = []
    totals: dict[str, float] = {}
    for name, d_in, d_out, per_layer, layers, per_sample in LINEAR_SHAPES_7B:
        d_in, d_out = max(16, d_in // a.scale), max(16, d_out // a.scale)
        tokens = a.batch * per_sample
        linear = torch.nn.Linear(d_in, d_out, bias=False, device=device, dtype=torch.bfloat16)
        linear.weight.data.mul_(d_in**-0.5).requires_grad_(False)
        x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16)
        times = per_layer * layers
        ms = {"bf16": wall_ms(_step(linear, x, grad), a.iters, device)}
        for scaling in ("row", "tensor"):
            layer = Float8FrozenLinear(linear, scaling)
            ms[f"fp8_{scaling}"] = wall_ms(_step(layer, x, grad), a.iters, device)
        for k, v in ms.items():
            totals[k] = totals.get(k, 0.0) + v * times
        rows.append({**common, **shape_fields(name, d_in, d_out, tokens, times), **_columns(ms, 3)})
        del linear, x, grad
    total_row = "step total (base GEMMs, forward once + input gradient)"
    rows.append({**common, "row": total_row, **_columns(totals, 1)})
    return rows


def _columns(ms: dict[str, float], digits: int) -> dict:
    """bf16_ms, fp8_row_ms, fp8_tensor_ms and the speedups bf16 / fp8 of each scaling."""
    out = {f"{k}_ms": round(v, digits) for k, v in ms.items()}
    for scaling in ("row", "tensor"):
        out[f"speedup_{scaling}"] = round(ms["bf16"] / ms[f"fp8_{scaling}"], 3)
    return out


def table(rows: list[dict]) -> str:
    """A markdown table: ms per call for each shape and way, and the step total."""
    from bench.kernel_rows import SHAPE_HEADER, shape_cells

    lines = [
        SHAPE_HEADER + "| bf16 ms | fp8 row ms | fp8 tensor ms | bf16/fp8 row | bf16/fp8 tensor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['error']} | | | | | | | |")
            continue
        lines.append(
            shape_cells(r) + f"| {r['bf16_ms']} | {r['fp8_row_ms']} | {r['fp8_tensor_ms']} "
            f"| {r['speedup_row']} | {r['speedup_tensor']} |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This script's own options (--device and --out come from bench.kernel_rows)."""
    p.add_argument("--batch", type=int, default=32, help="samples per step (run 16's plateau: 32)")
    p.add_argument("--scale", type=int, default=1, help="divide every dimension (CPU smoke runs)")
    p.add_argument("--iters", type=int, default=20)


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure, append the rows to --out and print the table (bench.kernel_rows' command line)."""
    from bench.kernel_rows import run_cli

    return run_cli(__doc__, add_arguments, measure, table, argv)


if __name__ == "__main__":
    # As a script, sys.path[0] is bench/: the shared module is imported from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(0 if main() else 1)
