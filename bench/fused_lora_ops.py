"""How much dispatch work train.fused_lora removes from a training step: PEFT's LoRA layers vs
the fused ones, side by side on one model, batch and machine.

    python bench/fused_lora_ops.py --shape small --batch 4 --steps 10

Builds a random-weight Qwen2-VL (--shape), puts LoRA on every linear layer with the train
stage's own loader (vlm_ray.train.hf_engine.load_hf_model), collates one batch with the
project's collator, and for each variant times forward + backward over --steps steps (after two
warm-up steps) and counts, over one profiled step, the ATen ops dispatched (every op the
dispatcher runs, nested ones included: on a GPU each leaf op is a kernel launch) and the nodes
of the autograd graph. Where the step is bound by the CPU issuing work (small batches on a
GPU, the regime of training run 4), these counts are what the fused path cuts; on a CPU the
step time also measures it, since small matrices make dispatch a large share of the work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def autograd_nodes(loss: torch.Tensor) -> int:
    """Nodes reachable from loss.grad_fn: the backward graph autograd walks."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(fn for fn, _ in node.next_functions)
    return len(seen)


def measure(model, batch: dict, steps: int) -> dict:
    """Step time (median ms), ATen ops per step and autograd nodes of one forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    loss = model(**batch).loss
    nodes = autograd_nodes(loss)
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return {
        "step_ms": round(statistics.median(times), 2),
        "aten_ops_per_step": ops,
        "autograd_nodes": nodes,
        "loss": round(loss.item(), 6),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="small", help="a vlm_ray.models.tiny SHAPES key")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="append the result as a JSON line here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from test_collator import _rows

    from vlm_ray.config import parse_spec
    from vlm_ray.models.families import family_of
    from vlm_ray.models.tiny import build_tiny_model
    from vlm_ray.train.collator import VisionSFTCollator
    from vlm_ray.train.hf_engine import load_hf_model

    model_dir = build_tiny_model(
        Path(tempfile.gettempdir()) / f"fused_lora_ops_{a.shape}", family="qwen2_vl", size=a.shape
    )
    family = family_of(model_dir)
    rows = (_rows() * a.batch)[: a.batch]
    result: dict = {"shape": a.shape, "batch": a.batch, "threads": torch.get_num_threads()}
    for fused in (False, True):
        spec = parse_spec(
            {
                "model": {"name": str(model_dir)},
                "data": {"source": "unused"},
                "train": {"engine": "hf", "fused_lora": fused},
            }
        )
        torch.manual_seed(0)
        model, processor, _ = load_hf_model(spec, str(model_dir), family)
        model = model.float().train()
        batch = VisionSFTCollator(processor, family, True, max_seq_length=1024)(rows)
        layers = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
        result["lora_layers"] = layers
        result["fused" if fused else "peft"] = measure(model, batch, a.steps)
        print(("fused" if fused else "peft"), json.dumps(result["fused" if fused else "peft"]))
    peft, fused = result["peft"], result["fused"]
    result["ratios"] = {
        "step_time": round(fused["step_ms"] / peft["step_ms"], 3),
        "aten_ops": round(fused["aten_ops_per_step"] / peft["aten_ops_per_step"], 3),
        "autograd_nodes": round(fused["autograd_nodes"] / peft["autograd_nodes"], 3),
        "aten_ops_saved_per_lora_layer": round(
            (peft["aten_ops_per_step"] - fused["aten_ops_per_step"]) / layers, 1
        ),
    }
    print(json.dumps(result["ratios"]))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
