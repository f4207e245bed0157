"""The vision tower's costliest kernels at the inference benchmark's shape, each way torch can run them.

Inference run 9 profiled a batch-512 prefill (2B shape, 448 px: 512 x 1,024 patches). The
compiled vision tower took 1.32 s of GPU time:
- float8 GEMMs: 0.43 s;
- their per-row activation scaling: at least 0.44 s;
- flash attention at head size 80: 0.36 s.

This script measures what each vision-tower lever would buy, kernel by kernel, before either is
built into the model:

  attention  SDPA over [images, 16 heads, 1,024 patches, 80], one row per backend torch offers
             (flash, cuDNN, memory-efficient; math only on CPU).
  linear     each vision linear layer (qkv, proj, fc1, fc2) over every patch, run as:
             - bf16: a plain GEMM;
             - fp8-dynamic-rowwise: what infer.fp8 does now (per-row amax, scale, cast, then a
               scaled GEMM with per-channel weight scales), compiled so that Inductor fuses
               the scaling, as it does in the model;
             - fp8-dynamic-tensorwise: infer.fp8_scaling: tensor, one scale per activation
               tensor computed at run time (an amax over the whole tensor, then scale and cast)
               and one per weight, then a tensor-scaled GEMM;
             - fp8-static-tensorwise: scales calibrated once (one for the activation, one for
               the weight), so scaling is only a multiply and cast, then a scaled GEMM;
             - fp8-static-rowwise-gemm: the static activation scale handed to the per-row GEMM,
               which keeps the per-channel weight scales;
             - the scaling alone, for both float8 ways.

Every row carries its time (median of --repeat, after --warmup), its TFLOPS, and its error
against bf16: max |difference| / max |bf16 output|.

    python bench/vision_kernels.py --out $R/vision_kernels.jsonl            # on the GPU (~1 min)
    python bench/vision_kernels.py --language --out ...                     # + the language model's
    python bench/vision_kernels.py --device cpu --images 2 --patches 64     # a plumbing check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Qwen2-VL-2B's vision tower (vlm_ray.models.tiny SHAPES["2b"]): width 1280, 16 heads, MLP 5120.
WIDTH, HEADS, MLP = 1280, 16, 5120
LINEARS = {
    "qkv": (WIDTH, 3 * WIDTH),
    "proj": (WIDTH, WIDTH),
    "fc1": (WIDTH, MLP),
    "fc2": (MLP, WIDTH),
}
# With --language: the 2B language model's linear layers (SHAPES["2b"]: hidden 1536, 12 heads and
# 2 KV heads of 128, MLP 8960), in the prefill (every token of the batch) and in one decoding
# step (one token per image): what infer.fp8: all with static scales would change there.
LANGUAGE_LINEARS = {
    "lm.q,o": (1536, 1536),
    "lm.k,v": (1536, 256),
    "lm.gate,up": (1536, 8960),
    "lm.down": (8960, 1536),
}
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def timer(device: str, warmup: int, repeat: int) -> Callable[[Callable[[], object]], float]:
    """A function that runs `fn` warmup + repeat times and returns the median of the timed runs, in ms."""
    import torch

    def run(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if device == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    return run


def relative_error(out, ref) -> float:
    """max |out - ref| / max |ref|, in float32."""
    ref = ref.float()
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def attention_rows(images: int, patches: int, device: str, time_it) -> list[dict]:
    """SDPA at the vision tower's shape with each backend; rows say which ran and how fast."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dim = WIDTH // HEADS
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(images, HEADS, patches, dim, device=device, dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )
    flops = 4 * images * HEADS * patches * patches * dim
    backends = [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
    ]
    if device == "cpu":
        backends.append(SDPBackend.MATH)
    rows, ref = [], None
    for backend in backends:
        row = {"kernel": "attention", "variant": backend.name.lower(), "shape": list(q.shape)}

        def call(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            out = call()
        except RuntimeError as error:  # this backend does not take this shape / device
            rows.append({**row, "error": str(error).splitlines()[0][:200]})
            continue
        ref = out if ref is None else ref
        ms = time_it(call)
        rows.append(
            {
                **row,
                "ms": round(ms, 3),
                "tflops": round(flops / ms / 1e9, 1),
                "rel_err": round(relative_error(out, ref), 5),
            }
        )
    return rows


def quantize_rowwise(x):
    """Per-row float8 scaling as infer.fp8 does it: (x / scale) in e4m3 and the [rows, 1] scales."""
    import torch

    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_tensorwise(x):
    """Per-tensor float8 scaling at run time (infer.fp8_scaling: tensor): one amax, one scale."""
    import torch

    scale = x.float().abs().amax().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_static(x, inverse_scale):
    """Float8 with a scale fixed beforehand: a multiply, a clamp and a cast."""
    import torch

    return (x.float() * inverse_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def linear_rows(
    name: str, tokens: int, device: str, time_it, compile_scaling: bool, shape=None
) -> list[dict]:
    """One linear layer (a vision one by name, or `shape` = (in, out)) over `tokens` rows, in
    bf16 and the float8 ways."""
    import torch

    k_in, n_out = shape or LINEARS[name]
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, k_in, device=device, dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(n_out, k_in, device=device, generator=gen) / k_in**0.5).to(torch.bfloat16)
    flops = 2 * tokens * k_in * n_out
    shape = [tokens, k_in, n_out]

    rowwise = torch.compile(quantize_rowwise) if compile_scaling else quantize_rowwise
    static = torch.compile(quantize_static) if compile_scaling else quantize_static
    tensorwise = torch.compile(quantize_tensorwise) if compile_scaling else quantize_tensorwise
    # The weight is quantized once, as at load: per output channel, and per tensor.
    w_q, w_scale = quantize_rowwise(w)
    w_t_scale = w.float().abs().max() / FP8_MAX
    w_t = (w.float() / w_t_scale).to(torch.float8_e4m3fn)
    # The static activation scale, calibrated once on this input (outside the timing).
    a_scale = x.float().abs().max() / FP8_MAX
    a_inverse = 1.0 / a_scale
    a_rows = torch.full((tokens, 1), float(a_scale), device=device)

    def bf16():
        return x @ w.t()

    def fp8_dynamic():
        xq, scale = rowwise(x)
        return torch._scaled_mm(
            xq, w_q.t(), scale_a=scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16
        )

    def fp8_dynamic_tensorwise():
        xq, scale = tensorwise(x)
        return torch._scaled_mm(
            xq, w_t.t(), scale_a=scale, scale_b=w_t_scale, out_dtype=torch.bfloat16
        )

    def fp8_static_tensorwise():
        xq = static(x, a_inverse)
        return torch._scaled_mm(
            xq, w_t.t(), scale_a=a_scale, scale_b=w_t_scale, out_dtype=torch.bfloat16
        )

    def fp8_static_rowwise_gemm():
        xq = static(x, a_inverse)
        return torch._scaled_mm(
            xq, w_q.t(), scale_a=a_rows, scale_b=w_scale.t(), out_dtype=torch.bfloat16
        )

    ref = bf16()
    rows = []
    for variant, fn, gemm in (
        ("bf16", bf16, True),
        ("fp8-dynamic-rowwise", fp8_dynamic, True),
        ("fp8-dynamic-tensorwise", fp8_dynamic_tensorwise, True),
        ("fp8-static-tensorwise", fp8_static_tensorwise, True),
        ("fp8-static-rowwise-gemm", fp8_static_rowwise_gemm, True),
        ("scaling-only-dynamic-rowwise", lambda: rowwise(x), False),
        ("scaling-only-dynamic-tensorwise", lambda: tensorwise(x), False),
        ("scaling-only-static", lambda: static(x, a_inverse), False),
    ):
        row = {"kernel": name, "variant": variant, "shape": shape}
        try:
            out = fn()
            ms = time_it(fn)
        except (RuntimeError, NotImplementedError) as error:
            rows.append({**row, "error": str(error).splitlines()[0][:200]})
            continue
        row["ms"] = round(ms, 3)
        if gemm:
            row["tflops"] = round(flops / ms / 1e9, 1)
            row["rel_err"] = round(relative_error(out, ref), 5)
        rows.append(row)
    return rows


def measure(a: argparse.Namespace) -> list[dict]:
    """Every row, attention first, then each linear layer."""
    import torch

    from bench.kernel_rows import measured_on

    time_it = timer(a.device, a.warmup, a.repeat)
    compile_scaling = a.compile if a.compile is not None else a.device == "cuda"
    rows = attention_rows(a.images, a.patches, a.device, time_it)
    for name in LINEARS:
        rows += linear_rows(name, a.images * a.patches, a.device, time_it, compile_scaling)
        if a.device == "cuda":
            torch.cuda.empty_cache()
    if a.language:
        for name, shape in LANGUAGE_LINEARS.items():
            for phase, tokens in (("prefill", a.images * a.language_tokens), ("decode", a.images)):
                rows += linear_rows(
                    f"{name} {phase}", tokens, a.device, time_it, compile_scaling, shape
                )
            if a.device == "cuda":
                torch.cuda.empty_cache()
    context = {
        **measured_on(a.device),
        "images": a.images,
        "patches": a.patches,
        "scaling_compiled": compile_scaling,
        "language_tokens_per_image": a.language_tokens if a.language else None,
    }
    return [{**context, **row} for row in rows]


def table(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = ["| kernel | variant | ms | TFLOPS | error vs bf16 |", "|---|---|---|---|---|"]
    for r in rows:
        ms = r.get("ms", r.get("error", "-"))
        lines.append(
            f"| {r['kernel']} | {r['variant']} | {ms} | {r.get('tflops', '-')} | {r.get('rel_err', '-')} |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This script's own options (--device and --out come from bench.kernel_rows)."""
    p.add_argument(
        "--images", type=int, default=512, help="images per batch (inference runs 7-10: 512)"
    )
    p.add_argument("--patches", type=int, default=1024, help="patches per image (448 px: 1,024)")
    p.add_argument(
        "--language",
        action="store_true",
        help="also the 2B language model's linear layers, in the prefill and one decoding step",
    )
    p.add_argument(
        "--language-tokens",
        type=int,
        default=280,
        help="prompt tokens per image in the prefill (448 px: 256 image tokens + the text's)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the float8 scaling, as the model's compiled blocks fuse it (default: on CUDA)",
    )


def main(argv: list[str] | None = None) -> list[dict]:
    # Run as a script, bench/ is sys.path[0]; the shared module is imported from the root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.kernel_rows import run_cli

    return run_cli(__doc__, add_arguments, measure, table, argv)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
