"""Which LoRA add computes the right gradients when compiled: Unsloth's (an addmm) or
train.lora_add_without_copy's (a matmul and an add), against a float32 reference.

Why: training run 27 (one H100, 7B, batch 32) trained to a different loss with
train.lora_add_without_copy (9.636 and 9.638 over two runs against 9.703 and 9.704 without),
from the second step on (the first step's loss agrees: LoRA's B starts at zero). Unsloth's own
source says Inductor miscompiled addmm(alpha=scaling, beta=1) traced inside a compiled block,
the VLM decoder MLP named, forward and backward, in torch 2.8 and 2.9 (unsloth#3271), and
uses the addmm from 2.10 on. This measures both adds where they run in training: a Qwen2
decoder MLP (gate and up from one input, SiLU times up, down) with LoRA on each of the three
linear layers, compiled with Unsloth's own Inductor options where Unsloth is installed.

Each way's output and gradients (the input's and every A's and B's) are compared with the same
block run in float32, op by op, from the same bf16 values: the relative error
||got - ref|| / ||ref|| per tensor. bf16 op by op (Unsloth's add, eager) is the yardstick for
rounding alone. Two states of B: zero (the first step: only B gets a gradient) and small random
values (every later step).

    python bench/lora_add_fidelity.py --out $R/lora_add_fidelity.jsonl        # GPU, ~1 minute
    python bench/lora_add_fidelity.py --device cpu --batch 1 --scale 32       # CPU: it runs
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

RANK = 16
WAYS = ("unsloth_eager", "ours_eager", "unsloth_compiled", "ours_compiled")
TENSORS = ("out", "x", "A_gate", "B_gate", "A_up", "B_up", "A_down", "B_down")


# Unsloth's main Inductor options (unsloth_zoo's get_torch_compile_options), for where Unsloth is
# not installed (CPU)
UNSLOTH_MAIN_OPTIONS = {
    "epilogue_fusion": True,
    "max_autotune": False,
    "shape_padding": True,
    "memory_planning": True,
    "dce": True,
}


def unsloth_compile_options() -> tuple[dict, str]:
    """The Inductor options Unsloth compiles its modules with, and where they came from:
    unsloth_zoo's own where it imports, else UNSLOTH_MAIN_OPTIONS (with the reason)."""
    if importlib.util.find_spec("unsloth_zoo") is None:
        return UNSLOTH_MAIN_OPTIONS, "unsloth's main options (unsloth_zoo not installed)"
    # unsloth_zoo refuses to import unless `import unsloth` has set UNSLOTH_IS_PRESENT (run 28 fell
    # back to Inductor's defaults on that); importing unsloth itself would patch transformers and
    # PEFT, which these benches measure outside Unsloth, so only the flag is set
    os.environ.setdefault("UNSLOTH_IS_PRESENT", "1")
    try:
        from unsloth_zoo.compiler import get_torch_compile_options

        return get_torch_compile_options(), "unsloth_zoo's"
    except Exception as e:  # e.g. no accelerator for unsloth_zoo to set up
        return UNSLOTH_MAIN_OPTIONS, f"unsloth's main options (unsloth_zoo: {e!r:.120})"


def _mlp(weights: dict, lora_forward: Any):
    """x -> down(silu(gate(x)) * up(x)), each linear layer frozen with a LoRA adapter whose
    product `lora_forward` adds to the base layer's output (scaling 1: lora_alpha = r)."""
    import torch
    import torch.nn.functional as F

    identity = torch.nn.Identity()

    def lora_linear(name: str, x: torch.Tensor) -> torch.Tensor:
        base, a, b = weights[name]
        return lora_forward(F.linear(x, base), a, b, identity, x, 1.0)

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = F.silu(lora_linear("gate", x)) * lora_linear("up", x)
        return lora_linear("down", h)

    return forward


def _weights(d_model: int, d_ff: int, b_std: float, dtype: Any, device: str) -> dict:
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)

    def lin(d_in: int, d_out: int, std: float) -> torch.nn.Linear:
        layer = torch.nn.Linear(d_in, d_out, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(d_out, d_in, generator=g) * std)
        return layer.to(device=device, dtype=dtype)

    out = {}
    for name, d_in, d_out in (
        ("gate", d_model, d_ff),
        ("up", d_model, d_ff),
        ("down", d_ff, d_model),
    ):
        base = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device=device, dtype=dtype)
        out[name] = (base, lin(d_in, RANK, 1 / d_in**0.5), lin(RANK, d_out, b_std))
    return out


def _grads(forward: Any, weights: dict, x: Any, grad: Any) -> dict:
    """The block's output and the gradients of x and of every A and B, as float32."""
    x = x.detach().requires_grad_(True)
    params = {}
    for name, (_, a, b) in weights.items():
        params[f"A_{name}"], params[f"B_{name}"] = a.weight, b.weight
        a.weight.grad = b.weight.grad = None
    out = forward(x)
    out.backward(grad)
    got = {"out": out.detach().float(), "x": x.grad.float()}
    got.update({k: p.grad.float() for k, p in params.items()})
    return got


def _as(weights: dict, dtype: Any) -> dict:
    """A copy of the block's weights in `dtype` (the float32 reference's)."""
    import copy

    return {
        n: (base.to(dtype), copy.deepcopy(a).to(dtype), copy.deepcopy(b).to(dtype))
        for n, (base, a, b) in weights.items()
    }


def rel_error(got: Any, ref: Any) -> float:
    """||got - ref|| / ||ref|| (0 where both are zero)."""
    import torch

    norm = torch.linalg.vector_norm(ref).item()
    diff = torch.linalg.vector_norm(got - ref).item()
    return diff / norm if norm else diff


def measure(a: argparse.Namespace) -> list[dict]:
    """One row per state of B and way: the relative error of each tensor."""
    import torch

    from bench.kernel_rows import LINEAR_SHAPES_7B, measured_on
    from bench.lora_add import unsloth_lora_forward
    from vlm_ray.models.lora_add_without_copy import LoraAddCount, make_lora_forward_without_copy

    device = a.device
    options, options_from = unsloth_compile_options()
    # the MLP's widths and tokens per sample: the gate/up row of the 7B shapes
    _, d_model, d_ff, _, _, per_sample = next(
        shape for shape in LINEAR_SHAPES_7B if shape[0] == "language gate/up"
    )
    d_model, d_ff = max(16, d_model // a.scale), max(16, d_ff // a.scale)
    tokens = max(1, per_sample // a.scale)
    common = {
        "batch": a.batch,
        "tokens_per_sample": tokens,
        "d_model": d_model,
        "d_ff": d_ff,
        "rank": RANK,
        "compile_options": options_from,
        **measured_on(device),
    }
    ours = make_lora_forward_without_copy(unsloth_lora_forward, LoraAddCount())
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(a.batch, tokens, d_model, generator=g).to(device, torch.bfloat16)
    grad = (torch.randn(a.batch, tokens, d_model, generator=g) * 1e-3).to(device, torch.bfloat16)
    rows = []
    for state, b_std in (("B zero (first step)", 0.0), ("B random (later steps)", a.b_std)):
        weights = _weights(d_model, d_ff, b_std, torch.bfloat16, device)
        as_float = _as(weights, torch.float32)
        reference = _grads(_mlp(as_float, unsloth_lora_forward), as_float, x.float(), grad.float())
        for way in WAYS:
            who, mode = way.split("_")
            forward = _mlp(weights, unsloth_lora_forward if who == "unsloth" else ours)
            if mode == "compiled":
                torch._dynamo.reset()
                forward = torch.compile(forward, dynamic=False, options=options)
            got = _grads(forward, weights, x, grad)
            errors = {t: float(f"{rel_error(got[t], reference[t]):.3g}") for t in TENSORS}
            rows.append({**common, "B": state, "way": way, **errors})
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table: each tensor's relative error to float32, per state of B and way."""
    lines = [
        "| B | way | " + " | ".join(TENSORS) + " |",
        "|---|---|" + "---|" * len(TENSORS),
    ]
    for r in rows:
        lines.append(f"| {r['B']} | {r['way']} | " + " | ".join(str(r[t]) for t in TENSORS) + " |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This script's own options (--device and --out come from bench.kernel_rows)."""
    p.add_argument("--batch", type=int, default=32, help="samples (320 tokens each at --scale 1)")
    p.add_argument("--scale", type=int, default=1, help="divide every dimension (CPU smoke runs)")
    p.add_argument("--b-std", type=float, default=2e-3, help="B's values in the later-steps state")


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure, append the rows to --out and print the table (bench.kernel_rows' command line)."""
    from bench.kernel_rows import run_cli

    return run_cli(__doc__, add_arguments, measure, table, argv)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(0 if main() else 1)
