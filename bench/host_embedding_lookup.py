"""What train.host_input_embedding costs the training loop, against the two other places the
input embedding can be looked up, at the 7B batch-4 shape.

Rows (each the time one step spends on it):
- worker lookup: the rows looked up on the host with one thread, as a data loader worker does
  for host_input_embedding (beside the GPU step, not on the training loop's thread);
- pinned rows to GPU: what host_input_embedding adds to the training loop, the copy of the
  looked-up rows from pinned memory to the GPU with the rest of the batch;
- GPU lookup: the table on the GPU, as without either setting (1.02 GiB of GPU memory at 7B);
- offload on the loop: Unsloth's model.offload_embedding way, on the training loop's thread:
  the ids copied to the host (a sync), looked up there, the rows copied up from pageable memory.

Each row is timed over --iters calls and synchronised at both ends. On CPU only the worker
lookup runs; the others say they need CUDA.

    python bench/host_embedding_lookup.py --out $R/host_embedding_lookup.jsonl      # GPU, seconds
    python bench/host_embedding_lookup.py --device cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def measure(a: argparse.Namespace) -> list[dict]:
    """The four rows (those needing CUDA carry an error off it)."""
    import torch
    import torch.nn.functional as F

    from bench.kernel_rows import measured_on, wall_ms

    torch.manual_seed(0)
    table = torch.randn(a.vocab, a.hidden, dtype=torch.bfloat16)
    ids = torch.randint(0, a.vocab, (a.batch, a.tokens))
    shape = {
        "vocab": a.vocab,
        "hidden": a.hidden,
        "ids": a.batch * a.tokens,
        "rows_mb": round(a.batch * a.tokens * a.hidden * 2 / 1e6, 2),
        **measured_on(a.device),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a data loader worker's setting
    try:
        worker = wall_ms(lambda: F.embedding(ids, table), a.iters, "cpu")
    finally:
        torch.set_num_threads(threads)
    rows = [{**shape, "row": "worker lookup", "ms": round(worker, 3)}]
    names = ["pinned rows to GPU", "GPU lookup", "offload on the loop"]
    if a.device != "cuda":
        return rows + [{**shape, "row": n, "error": "needs a CUDA device"} for n in names]

    pinned = F.embedding(ids, table).pin_memory()
    on_gpu = table.cuda()
    ids_gpu = ids.cuda()

    def offloaded() -> torch.Tensor:
        return F.embedding(ids_gpu.cpu(), table).to("cuda")

    steps = [
        lambda: pinned.to("cuda"),  # blocking, as the Trainer moves a batch
        lambda: F.embedding(ids_gpu, on_gpu),
        offloaded,
    ]
    for name, step in zip(names, steps, strict=True):
        rows.append({**shape, "row": name, "ms": round(wall_ms(step, a.iters, "cuda"), 3)})
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table: ms per step for each way."""
    lines = ["| way | ms per step | on the training loop? |", "|---|---|---|"]
    on_loop = {"worker lookup": "no (a loader worker)"}
    for r in rows:
        ms = r.get("ms", r.get("error"))
        lines.append(f"| {r['row']} | {ms} | {on_loop.get(r['row'], 'yes')} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This script's own options (--device and --out come from bench.kernel_rows)."""
    p.add_argument("--vocab", type=int, default=152064, help="rows of the table (7B: 152,064)")
    p.add_argument("--hidden", type=int, default=3584, help="its width (7B: 3,584)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=316, help="tokens per sample (448 px: ~316)")
    p.add_argument("--iters", type=int, default=50)


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure, append the rows to --out and print the table (bench.kernel_rows' command line)."""
    from bench.kernel_rows import run_cli

    return run_cli(__doc__, add_arguments, measure, table, argv)


if __name__ == "__main__":
    # As a script, sys.path[0] is bench/: the shared module is imported from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(0 if main() else 1)
