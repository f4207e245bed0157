"""What train.lora_add_without_copy buys: a LoRA layer's forward and backward with Unsloth's add
(an out-of-place addmm that copies the base layer's output first) and with ours, eager and
compiled, side by side at the 7B shapes and a large batch.

One row per distinct linear shape of Qwen2-VL-7B (bench/kernel_rows.LINEAR_SHAPES_7B), run as a
LoRA layer in a step: the frozen bf16 base GEMM, LoRA's A and B products (r=16, scaling 1, as the
training benchmark's lora_alpha = r), and a SiLU standing for the elementwise work that follows
every LoRA layer in the model (the rotary embedding, SiLU times up, the residual add), then the
backward. "eager" runs it op by op; "compiled" under torch.compile (Inductor), as Unsloth's
compiled modules run their LoRA layers. The compiled rows also say whether Inductor's code for the
forward calls addmm, which copies its summand first. A last row adds the shapes up by how often a
step runs them (forward once: the vision tower's recomputation under checkpointing is not counted).

    python bench/lora_add.py --out $R/lora_add.jsonl                          # GPU, ~2 minutes
    python bench/lora_add.py --device cpu --batch 1 --scale 32 --iters 1      # CPU: it runs

--scale divides every dimension (CPU smoke runs); the figures that mean something are CUDA ones
at --scale 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

RANK = 16
WAYS = ("unsloth_eager", "ours_eager", "unsloth_compiled", "ours_compiled")


def unsloth_lora_forward(result, lora_A, lora_B, dropout, x, scaling):
    """Unsloth's lora_forward (unsloth_zoo 2026.10.7's COMPILED_LORA_FORWARD, the torch >= 2.10
    branch): result + scaling * (x A^T) B^T as one out-of-place addmm, the same operands in the
    same order. The comparison point of the bench and of tests/test_lora_add_without_copy.py
    (Unsloth itself needs a GPU)."""
    import torch

    dtype = result.dtype
    xA = dropout(x).to(dtype) @ lora_A.weight.to(dtype).t()
    shape = result.shape
    output = torch.addmm(
        result.view(-1, shape[-1]),
        xA.view(-1, xA.shape[-1]),
        lora_B.weight.to(dtype).t(),
        alpha=scaling,
        beta=1,
    ).view(shape)
    if lora_B.bias is not None:
        output = torch.add(output, lora_B.bias.to(dtype), alpha=scaling)
    return output


def _lora_step(base: Any, lora_a: Any, lora_b: Any, lora_forward: Any):
    """x -> silu(base(x) + LoRA's product), the sum made by `lora_forward`."""
    import torch

    identity = torch.nn.Identity()

    def forward(x: torch.Tensor) -> torch.Tensor:
        result = base(x)
        return torch.nn.functional.silu(lora_forward(result, lora_a, lora_b, identity, x, 1.0))

    return forward


def _timed(forward: Any, params: list, x: Any, grad: Any):
    def run() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        forward(x).backward(grad)

    return run


def _compiled(forward: Any, x: Any, grad: Any) -> tuple[Any, bool]:
    """forward under torch.compile, and whether Inductor's code for its forward calls addmm
    (the first call makes the forward's code, then the backward's; this captures both)."""
    import torch
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()  # one compiled function per shape and way: no recompile limit
    compiled = torch.compile(forward, dynamic=False)

    def first_call() -> None:
        compiled(x).backward(grad)
        x.grad = None

    _, code = run_and_get_code(first_call)
    return compiled, "extern_kernels.addmm" in code[0]


def measure(a: argparse.Namespace) -> list[dict]:
    """One row per shape (each way's ms per forward + backward, the ratios, addmm in the
    compiled code or not) and the step total."""
    import torch

    from bench.kernel_rows import LINEAR_SHAPES_7B, measured_on, shape_fields, wall_ms
    from vlm_ray.models.lora_add_without_copy import LoraAddCount, make_lora_forward_without_copy

    device = a.device
    common = {
        "batch": a.batch,
        "scale": a.scale,
        "rank": RANK,
        **measured_on(device),
    }
    torch.manual_seed(0)
    ours = make_lora_forward_without_copy(unsloth_lora_forward, LoraAddCount())
    rows: list[dict] = []
    totals = dict.fromkeys(WAYS, 0.0)
    for name, d_in, d_out, per_layer, layers, per_sample in LINEAR_SHAPES_7B:
        if a.shapes and not any(s in name for s in a.shapes):
            continue
        d_in, d_out = max(16, d_in // a.scale), max(16, d_out // a.scale)
        tokens = a.batch * per_sample
        # as the model holds them: the language model's tokens (batch, sequence, features), the
        # vision tower's patches (patches, features)
        rows_shape = (a.batch, per_sample) if name.startswith("language") else (tokens,)
        kw = {"device": device, "dtype": torch.bfloat16}
        base = torch.nn.Linear(d_in, d_out, bias=False, **kw).requires_grad_(False)
        lora_a = torch.nn.Linear(d_in, RANK, bias=False, **kw)
        lora_b = torch.nn.Linear(RANK, d_out, bias=False, **kw)
        params = [lora_a.weight, lora_b.weight]
        x = torch.randn(*rows_shape, d_in, requires_grad=True, **kw)
        grad = torch.randn(*rows_shape, d_out, **kw)
        steps = {
            "unsloth_eager": _lora_step(base, lora_a, lora_b, unsloth_lora_forward),
            "ours_eager": _lora_step(base, lora_a, lora_b, ours),
        }
        addmm = {}
        for who in ("unsloth", "ours"):
            steps[f"{who}_compiled"], addmm[who] = _compiled(steps[f"{who}_eager"], x, grad)
        ms = {w: wall_ms(_timed(steps[w], params, x, grad), a.iters, device) for w in WAYS}
        times = per_layer * layers
        for w in WAYS:
            totals[w] += ms[w] * times
        rows.append(
            {
                **common,
                **shape_fields(name, d_in, d_out, tokens, times),
                **_columns(ms, 3),
                "addmm_in_unsloth_compiled": addmm["unsloth"],
                "addmm_in_ours_compiled": addmm["ours"],
            }
        )
        del base, lora_a, lora_b, x, grad, steps
    rows.append({**common, "row": "step total (forward once + backward)", **_columns(totals, 1)})
    return rows


def _columns(ms: dict[str, float], digits: int) -> dict:
    """Each way's ms and the speedups of ours over Unsloth's add, eager and compiled."""
    out = {f"{w}_ms": round(ms[w], digits) for w in WAYS}
    for mode in ("eager", "compiled"):
        out[f"speedup_{mode}"] = round(ms[f"unsloth_{mode}"] / ms[f"ours_{mode}"], 3)
    return out


def table(rows: list[dict]) -> str:
    """A markdown table: ms per forward + backward for each shape and way, and the ratios."""
    from bench.kernel_rows import SHAPE_HEADER, shape_cells

    lines = [
        SHAPE_HEADER + "| Unsloth eager | ours eager | Unsloth compiled | ours compiled "
        "| eager × | compiled × | addmm in the compiled forward (Unsloth / ours) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        addmm = (
            f"{r['addmm_in_unsloth_compiled']} / {r['addmm_in_ours_compiled']}"
            if "addmm_in_ours_compiled" in r
            else ""
        )
        lines.append(
            shape_cells(r)
            + "".join(f"| {r[f'{w}_ms']} " for w in WAYS)
            + f"| {r['speedup_eager']} | {r['speedup_compiled']} | {addmm} |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This script's own options (--device and --out come from bench.kernel_rows)."""
    p.add_argument("--batch", type=int, default=32, help="samples per step (the best batch: 32)")
    p.add_argument("--scale", type=int, default=1, help="divide every dimension (CPU smoke runs)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--shapes",
        nargs="*",
        default=None,
        help="only the shapes whose names contain one of these (e.g. gate/up); default: all",
    )


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure, append the rows to --out and print the table (bench.kernel_rows' command line)."""
    from bench.kernel_rows import run_cli

    return run_cli(__doc__, add_arguments, measure, table, argv)


if __name__ == "__main__":
    # As a script, sys.path[0] is bench/: the shared module is imported from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(0 if main() else 1)
