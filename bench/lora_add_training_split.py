"""Does a few steps of LoRA training come out the same with Unsloth's LoRA add and with
train.lora_add_without_copy's, eager and compiled? A whole tiny Qwen2-VL, outside Unsloth.

Why: training run 27 (one H100, 7B, batch 32, Unsloth's engine) trained to a different loss with
train.lora_add_without_copy, apart from the second step on. This harness isolates the add: the
project's tiny Qwen2-VL (larger random weights, bf16), PEFT LoRA r=16 on every linear layer, and
PEFT's LoRA forward replaced by Unsloth's shape of it (base layer, then `lora_forward(result, A,
B, dropout, x, scaling)`) with either add. "compiled" compiles every decoder layer and vision
block with torch.compile (Inductor, Unsloth's options: epilogue fusion, shape padding, memory
planning), as Unsloth compiles each block. The same batches, seed and AdamW steps for every way,
and the same in float32 (op by op) as the reference: each way's losses, its first loss's distance
from float32's (the first step's loss is the forward alone: B is still zero), and its LoRA B
tensors' cosines to eager Unsloth's and to float32's (AdamW's first step is about lr times the
gradient's sign, so a wrong gradient shows as a low cosine).

    python bench/lora_add_training_split.py --device cuda --out $R/lora_add_split.jsonl   # GPU
    python bench/lora_add_training_split.py --device cpu                                 # ~1 min
    python bench/lora_add_training_split.py --device cuda --size 2b --seeds 0 1   # real widths

Measured (docs/benchmarks.md, training run 28), the second step's loss against float32's:
on one H100 (tiny, seed 0) bf16 eager +0.0075, Unsloth's add compiled +0.0072, ours compiled
+0.0008; on CPU (2-core VM) over six seeds at the tiny size +0.0065 to +0.0076, +0.0057 to
+0.0081 and -0.0003 to +0.0026, and at the small size (4 layers, 128 wide; seeds 0 and 1)
+0.021 to +0.023 for both bf16 paths and +0.002 to +0.003 for ours; at the 2B shape (two
steps, seed 0) +0.278 bf16 eager, +0.276 Unsloth's add compiled, -0.041 ours: the bf16 paths'
lag grows with the model, as at 7B (step 2: ours 0.20 below Unsloth's compiled add, which logged eager
bf16's loss). Why: Inductor computes a fused chain of bf16 ops in float32 and rounds once, and
our add is fused into its consumer, where Unsloth's addmm is an extern kernel whose output is
rounded first; with --emulate-precision-casts ours compiled trains as eager again.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WAYS = ("fp32_eager", "unsloth_eager", "ours_eager", "unsloth_compiled", "ours_compiled")
REFERENCES = ("fp32_eager", "unsloth_eager")  # always run: every row is compared with both


def _batches(processor: Any, count: int, size: int, seed: int) -> list[dict]:
    """`count` batches of 4 random images (drawn from `seed`) with a prompt and a short answer;
    labels everywhere but the padding."""
    import torch
    from PIL import Image

    out = []
    for step in range(count):
        g = torch.Generator().manual_seed(seed * 1000 + step)
        images = [
            Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy())
            for _ in range(4)
        ]
        texts = []
        for i in range(4):
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read."}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"{step} {i} " * 4}]},
            ]
            texts.append(processor.apply_chat_template(messages, tokenize=False))
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        enc["labels"] = labels
        out.append(dict(enc))
    return out


# where the patched PEFT forward looks up the add (a module-level name, as in Unsloth's module)
_NAMESPACE: dict = {}


@contextlib.contextmanager
def _peft_forward_as_unsloths(namespace: dict) -> Iterator[None]:
    """PEFT's LoRA Linear forward, as Unsloth rewrites it: the base layer, then
    namespace['lora_forward'] for the one active adapter; PEFT's own again on leaving, so that
    nothing else in the process (a test suite) trains through this one."""
    from peft.tuners.lora.layer import Linear

    def forward(self, x, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            return namespace["lora_forward"](
                result,
                self.lora_A[name],
                self.lora_B[name],
                self.lora_dropout[name],
                x,
                self.scaling[name],
            )
        return result

    original = Linear.forward
    Linear.forward = forward
    try:
        yield
    finally:
        Linear.forward = original


def train_steps(
    base: Any,
    batches: list[dict],
    lora_forward: Any,
    compile_options: dict | None,
    device: str,
    fp32: bool,
):
    """AdamW steps (lr 2e-4, clipping at 1) over `batches` from `base` with LoRA r=16 on every
    linear layer (`fp32`: the model in float32; `compile_options`: every decoder layer and vision
    block compiled with them): (every step's loss, the LoRA B tensors as float32 on CPU)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch._dynamo.reset()
    _NAMESPACE["lora_forward"] = lora_forward
    torch.manual_seed(3407)
    config = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear")
    start = copy.deepcopy(base)  # base stays in host memory: at 7B only this copy is on the GPU
    model = get_peft_model((start.float() if fp32 else start).to(device), config)
    if compile_options is not None:
        for module in model.modules():
            name = type(module).__name__
            if name.endswith("DecoderLayer") or name.endswith("VisionBlock"):
                module.forward = torch.compile(
                    module.forward, options=compile_options, dynamic=False
                )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    losses = []
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items()}
        if fp32:
            inputs["pixel_values"] = inputs["pixel_values"].float()
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 5))
    b = {n: p.detach().float().cpu() for n, p in model.named_parameters() if "lora_B" in n}
    return losses, b


def measure(a: argparse.Namespace) -> list[dict]:
    """One row per seed and way: its step losses, their distance from float32's and its B
    tensors' cosines to eager Unsloth's and to float32's."""
    from torch._dynamo import config as dynamo_config
    from torch._inductor import config as inductor_config
    from transformers import AutoProcessor

    from bench.kernel_rows import measured_on
    from bench.lora_add import unsloth_lora_forward
    from bench.lora_add_fidelity import unsloth_compile_options
    from vlm_ray.models.lora_add_without_copy import LoraAddCount, make_lora_forward_without_copy
    from vlm_ray.models.tiny import build_tiny_model

    options, options_from = unsloth_compile_options()
    path = build_tiny_model(a.model_dir / a.size, family="qwen2_vl", size=a.size)
    processor = AutoProcessor.from_pretrained(path)
    adds = {
        "fp32": unsloth_lora_forward,  # the reference: Unsloth's add, op by op in float32
        "unsloth": unsloth_lora_forward,
        "ours": make_lora_forward_without_copy(unsloth_lora_forward, LoraAddCount()),
    }
    common = {
        **measured_on(a.device),
        "steps": a.steps,
        "size": a.size,
        "compile_options": options_from,
        "emulate_precision_casts": a.emulate_precision_casts,
    }
    # Inductor otherwise computes a fused chain of bf16 ops in float32 and rounds only what it
    # stores; emulating eager's roundings tells whether that is where the adds part. Each layer
    # is a recompile (its index is guarded on): past Dynamo's default limit of 8 the rest would
    # run eager, so the limit is Unsloth's (1024).
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    with (
        _peft_forward_as_unsloths(_NAMESPACE),
        inductor_config.patch(emulate_precision_casts=a.emulate_precision_casts),
        dynamo_config.patch(**{limit: 1024}),
    ):
        return _rows(a, path, processor, adds, options, common)


def _rows(
    a: argparse.Namespace, path: Path, processor: Any, adds: dict, options: dict, common: dict
) -> list[dict]:
    """measure's rows: every seed's ways trained with their add (`adds`, by the way's first
    word), the compiled ones with `options`."""
    rows = []
    for seed in a.seeds:
        base = _base_model(path, seed, a.size)
        batches = _batches(processor, a.steps, a.image, seed)
        results = {}
        for way in [w for w in WAYS if w in REFERENCES or w in a.ways]:
            who, mode = way.split("_")
            compiled = options if mode == "compiled" else None
            results[way] = train_steps(
                base, batches, adds[who], compiled, a.device, fp32=who == "fp32"
            )
        fp32_losses, fp32_b = results["fp32_eager"]
        for way, (losses, b) in results.items():
            off = [abs(x - y) for x, y in zip(losses, fp32_losses, strict=True)]
            rows.append(
                {
                    **common,
                    "seed": seed,
                    "way": way,
                    "losses": losses,
                    # the first step's loss is the forward alone (B is zero): its rounding
                    "first_loss_off_fp32": round(off[0], 6),
                    # every step's: the forward's rounding plus what the updates made of it
                    "mean_loss_off_fp32": round(sum(off) / len(off), 6),
                    **_cosines(b, results["unsloth_eager"][1], "unsloth_eager"),
                    **_cosines(b, fp32_b, "fp32"),
                }
            )
    return rows


def _base_model(path: Path, seed: int, size: str) -> Any:
    """The model in bf16 with weights drawn from `seed`: at the tiny size larger than its saved
    init, so that the loss moves per step; at larger ones 1/sqrt(fan-in), so that 28 layers of
    random weights do not blow the residual stream up."""
    import torch
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() >= 2:
                std = 0.08 if size == "tiny" else p.shape[-1] ** -0.5
                p.normal_(0.0, std, generator=g)
    return base


def _cosines(b: dict, reference: dict, name: str) -> dict:
    """The min and mean cosine of each B tensor to the reference's."""
    import torch

    cos = [
        torch.nn.functional.cosine_similarity(b[n].flatten(), reference[n].flatten(), dim=0).item()
        for n in reference
    ]
    return {
        f"min_cos_to_{name}": round(min(cos), 4),
        f"mean_cos_to_{name}": round(sum(cos) / len(cos), 4),
    }


def table(rows: list[dict]) -> str:
    """A markdown table: each way's losses, its first loss's distance from float32's, and its
    B tensors' cosines to eager Unsloth's and to float32's."""
    lines = [
        "| seed | way | losses | first loss − float32's | mean \\|loss − float32's\\| "
        "| B cosine to eager Unsloth's (min / mean) | B cosine to float32's (min / mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        losses = ", ".join(f"{x:.4f}" for x in r["losses"])
        lines.append(
            f"| {r['seed']} | {r['way']} | {losses} | {r['first_loss_off_fp32']:.2e} | "
            f"{r['mean_loss_off_fp32']:.2e} | "
            f"{r['min_cos_to_unsloth_eager']} / {r['mean_cos_to_unsloth_eager']} | "
            f"{r['min_cos_to_fp32']} / {r['mean_cos_to_fp32']} |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This script's own options (--device and --out come from bench.kernel_rows)."""
    p.add_argument("--steps", type=int, default=6, help="AdamW steps, one batch of 4 each")
    p.add_argument("--image", type=int, default=56, help="image side in pixels")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="one run of every way per seed (the weights and the images drawn from it)",
    )
    p.add_argument(
        "--ways",
        nargs="+",
        default=list(WAYS),
        choices=WAYS,
        help="fp32_eager and unsloth_eager always run: every way is compared with them",
    )
    p.add_argument(
        "--emulate-precision-casts",
        action="store_true",
        help="compiled ways round every bf16 intermediate as eager code does "
        "(torch._inductor.config.emulate_precision_casts)",
    )
    p.add_argument(
        "--size",
        default="tiny",
        choices=("tiny", "small", "2b", "7b"),
        help="the Qwen2-VL's shape (vlm_ray.models.tiny_common.SHAPES; 2b, 7b: real ones, for a GPU)",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=Path("/tmp/vlm_ray_split_qwen2_vl"),
        help="where the model is built, one folder per --size",
    )


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure, append the rows to --out and print the table (bench.kernel_rows' command line)."""
    from bench.kernel_rows import run_cli

    return run_cli(__doc__, add_arguments, measure, table, argv)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(0 if main() else 1)
