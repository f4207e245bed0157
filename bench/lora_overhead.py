"""What CUDA graphs would save on LoRA layers at the training benchmark's batch-4 shape.

At batch 4 the 7B training step is bound by the host, not the GPU. Run 9 found the GPU busy
for about a fifth of the step, with ~8,000 kernel launches per step, most of them in LoRA
linear layers (7 per decoder layer, 4 per vision block). CUDA graphs capture a sequence of
kernels once and replay it with one launch. This script prices that lever on a stack of LoRA
layers before anyone builds it into the engine.

Setup: --layers PEFT LoRA linear layers (r=16, every one trainable), --width wide, over
--tokens rows (batch 4 of the 7B benchmark: 4 x 317 tokens). The base layer is bitsandbytes
4-bit NF4 (CUDA only) or bf16. Forward and backward are timed four ways:
- eager: as the Trainer runs them;
- cuda-graph: the whole stack through torch.cuda.make_graphed_callables (forward and backward
  captured once, then replayed);
- graph per layer: each layer captured on its own, with its own memory pool, as
  train.cuda_graphs does with decoder layers;
- graphs in one pool: every layer in one make_graphed_callables call, sharing one memory pool
  (forwards replayed in order, backwards in reverse), the way to win back the memory the
  per-layer pools hold (7B, batch 4: +0.88 GiB with train.cuda_graphs, run 19).
The graph rows also give the GPU memory each capture holds and the step's peak.

Each row gives the wall time per iteration as the host sees it (synchronised over --iters
iterations). A capture that fails (a layer that syncs or allocates outside the graph) is a row
with its error, which is itself the answer for that base.

    python bench/lora_overhead.py --out $R/lora_overhead.jsonl                    # GPU, ~1 min
    python bench/lora_overhead.py --device cpu --bases bf16 --layers 4 --width 64 --tokens 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_stack(layers: int, width: int, rank: int, base: str, device: str):
    """A stack of `layers` width x width linear layers with LoRA adapters (PEFT), on `device`."""
    import torch
    from peft import LoraConfig, get_peft_model

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.Linear(width, width, bias=False) for _ in range(layers)
            )

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    stack = Stack().to(torch.bfloat16)
    for linear in stack.layers:
        torch.nn.init.normal_(linear.weight, std=width**-0.5)
    if base == "4bit":
        import bitsandbytes as bnb

        for i, linear in enumerate(stack.layers):
            quantized = bnb.nn.Linear4bit(
                width, width, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
            )
            quantized.weight = bnb.nn.Params4bit(
                linear.weight.data, requires_grad=False, quant_type="nf4"
            )
            stack.layers[i] = quantized
    stack = stack.to(device)  # bitsandbytes quantizes on the move to CUDA
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=r"layers\.\d+")
    return get_peft_model(stack, config).base_model.model  # the stack, LoRA layers injected


def rows_for(base: str, a: argparse.Namespace) -> list[dict]:
    """Eager and CUDA-graph rows for one base layer kind."""
    import torch

    from bench.kernel_rows import wall_ms

    stack = build_stack(a.layers, a.width, a.rank, base, a.device)
    x = torch.randn(a.tokens, a.width, device=a.device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(a.tokens, a.width, device=a.device, dtype=torch.bfloat16)
    shape = {"base": base, "layers": a.layers, "width": a.width, "tokens": a.tokens, "rank": a.rank}

    def step(module):
        def run():
            module(x).backward(grad)

        return run

    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    eager = {
        **shape,
        "variant": "eager",
        "wall_ms": round(wall_ms(step(stack), a.iters, a.device), 3),
    }
    if a.device == "cuda":
        eager["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    rows = [eager]
    graph_variants = ("cuda-graph", "graph per layer", "graphs in one pool")
    if a.device != "cuda":
        rows += [
            {**shape, "variant": v, "error": "CUDA graphs need a CUDA device"}
            for v in graph_variants
        ]
        return rows
    layers = list(stack.layers)

    def chained(graphs):
        def run():
            y = x
            for g in graphs:
                y = g(y)
            y.backward(grad)

        return run

    def samples():
        return tuple(torch.randn_like(x).requires_grad_() for _ in layers)

    captures = {
        # the whole stack as one callable: one graph, the upper bound on launch savings
        "cuda-graph": lambda: step(torch.cuda.make_graphed_callables(stack, (x,))),
        # each layer captured on its own, with its own memory pool (what train.cuda_graphs does)
        "graph per layer": lambda: chained(
            [
                torch.cuda.make_graphed_callables(m, (s,))
                for m, s in zip(layers, samples(), strict=True)
            ]
        ),
        # every layer in one make_graphed_callables call: one memory pool shared by all of them
        "graphs in one pool": lambda: chained(
            # one tuple of sample args per callable (run 22 passed bare tensors: a TypeError)
            torch.cuda.make_graphed_callables(tuple(layers), tuple((s,) for s in samples()))
        ),
    }

    def restore() -> None:
        # make_graphed_callables replaces a module's forward with its graph's: undo it, so the
        # next variant captures the layers themselves and the last one's graphs can be freed
        for module in (stack, *layers):
            module.__dict__.pop("forward", None)

    for variant, capture in captures.items():
        rows.append({**shape, "variant": variant, **graph_row(capture, restore, a)})
    return rows


def graph_row(capture, restore, a: argparse.Namespace) -> dict:
    """Wall time and memory of one captured variant: `capture()` returns its step function.

    reserved_gib: GPU memory the capture holds (its pools and static buffers), measured as the
    growth of reserved memory once the allocator's free cache is emptied; peak_gib: allocated
    memory at the highest point of one step. A failed capture is this row's answer. `restore()`
    undoes the capture afterwards.
    """
    import gc

    import torch

    from bench.kernel_rows import wall_ms

    gc.collect()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    try:
        run = capture()
        torch.cuda.empty_cache()  # what the warm-up left cached is not the capture's
        held = torch.cuda.memory_reserved() - reserved
        torch.cuda.reset_peak_memory_stats()
        ms = wall_ms(run, a.iters, a.device)
        row = {
            "wall_ms": round(ms, 3),
            "reserved_gib": round(held / 2**30, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        }
    except Exception as error:
        row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    finally:
        run = None  # drop the graphs (and their pools) before the next variant
        restore()
        gc.collect()
        torch.cuda.empty_cache()
    return row


def measure(a: argparse.Namespace) -> list[dict]:
    """Every row, for each base in --bases."""
    from bench.kernel_rows import measured_on

    context = measured_on(a.device)
    rows = []
    for base in a.bases.split(","):
        try:
            rows += rows_for(base, a)
        except Exception as error:  # e.g. bitsandbytes without CUDA
            rows.append(
                {"base": base, "variant": "eager", "error": f"{type(error).__name__}: {error}"}
            )
    return [{**context, **r} for r in rows]


def table(rows: list[dict]) -> str:
    """A markdown table, with each graph row's speed-up over the eager row of its base."""
    eager = {r["base"]: r.get("wall_ms") for r in rows if r["variant"] == "eager"}
    lines = [
        "| base | variant | wall ms per fwd+bwd | x eager | GiB held by the capture | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r.get("wall_ms")
        ratio = f"{eager[r['base']] / ms:.2f}" if ms and eager.get(r["base"]) else "-"
        memory = f"{r.get('reserved_gib', '-')} | {r.get('peak_gib', '-')}"
        lines.append(
            f"| {r['base']} | {r['variant']} | {ms if ms else r.get('error')} | {ratio} | {memory} |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This script's own options (--device and --out come from bench.kernel_rows)."""
    p.add_argument("--bases", default="4bit,bf16", help="comma-separated: 4bit (CUDA), bf16")
    p.add_argument("--layers", type=int, default=64, help="LoRA layers in the stack")
    p.add_argument("--width", type=int, default=3584, help="in = out features (7B hidden size)")
    p.add_argument("--tokens", type=int, default=4 * 317, help="rows: batch 4 of ~317 tokens")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)


def main(argv: list[str] | None = None) -> list[dict]:
    # Run as a script, bench/ is sys.path[0]; the shared module is imported from the root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.kernel_rows import run_cli

    return run_cli(__doc__, add_arguments, measure, table, argv)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
