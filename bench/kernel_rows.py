"""The shared command line of the small pricing benchmarks (lora_overhead.py, vision_kernels.py,
host_embedding_lookup.py): --device and --out, then measure, append the rows to --out as JSON
lines, print the table; and the timer and provenance (measured_on) they share."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path


def wall_ms(step: Callable[[], object], iters: int, device: str) -> float:
    """Mean wall time of `step()` over `iters` calls after one warm-up call, synchronised with
    the GPU at both ends when `device` is "cuda"."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return (time.perf_counter() - start) / iters * 1e3


# Qwen2-VL-7B's distinct linear shapes, which the per-shape pricing benches (fp8_frozen_linear.py,
# lora_add.py) run: (name, in, out, per layer, layers, rows per sample); rows per sample: the
# language model sees ~320 tokens of a 448 px sample, the vision tower 1,024 patches.
LINEAR_SHAPES_7B = [
    ("language q/o", 3584, 3584, 2, 28, 320),
    ("language k/v", 3584, 512, 2, 28, 320),
    ("language gate/up", 3584, 18944, 2, 28, 320),
    ("language down", 18944, 3584, 1, 28, 320),
    ("vision qkv", 1280, 3840, 1, 32, 1024),
    ("vision proj", 1280, 1280, 1, 32, 1024),
    ("vision fc1", 1280, 5120, 1, 32, 1024),
    ("vision fc2", 5120, 1280, 1, 32, 1024),
]

SHAPE_HEADER = "| shape | in x out | tokens | per step "


def shape_fields(name: str, d_in: int, d_out: int, tokens: int, per_step: int) -> dict:
    """A per-shape row's own fields, the ones shape_cells reads."""
    return {"row": name, "in": d_in, "out": d_out, "tokens": tokens, "per_step": per_step}


def shape_cells(row: dict) -> str:
    """A per-shape table row's first four cells under SHAPE_HEADER: its name, in x out, tokens
    and uses per step (the last three blank on a total row)."""
    dims = f"{row['in']} x {row['out']}" if "in" in row else ""
    return f"| {row['row']} | {dims} | {row.get('tokens', '')} | {row.get('per_step', '')} "


def measured_on(device: str) -> dict:
    """Where and when a row was measured: the device's name, torch's version and the date."""
    import torch

    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def build_parser(
    doc: str, add_arguments: Callable[[argparse.ArgumentParser], None]
) -> argparse.ArgumentParser:
    """--device and --out, then the script's own options from `add_arguments`."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, default=None, help="append the rows here as JSON lines")
    add_arguments(p)
    return p


def run_cli(
    doc: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    measure: Callable[[argparse.Namespace], list[dict]],
    table: Callable[[list[dict]], str],
    argv: list[str] | None = None,
) -> list[dict]:
    """Parse `argv` (the script's own options from `add_arguments`, plus --device and --out),
    run `measure`, append its rows to --out, print `table(rows)`, and return the rows."""
    a = build_parser(doc, add_arguments).parse_args(argv)
    rows = measure(a)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with a.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(table(rows), flush=True)
    return rows
