"""The ratio table of one hold's training runs, for docs/benchmarks.md.

    python -m bench.train_hold_ratios bench/results/train/run24*/r/train_7b.json
    python -m bench.train_hold_ratios --baseline "stage[bs32,16bit,fp8-wide,label-span,w2" \
        bench/results/train/run29d/r/train_7b.json

Every HF-baseline row (mode hf, any batch) of the files is a baseline, or with --baseline every
row whose label starts with that text (an A/B of ours in a hold without HF: run 29). Each row
is divided by the fastest baseline, by its rate (the timed steps' wall window) and by its
median step, since one slow step can move a rate (run 23). MFU counts 6 x params x tokens
over the bf16 dense peak for every row, with the FLOPs per sample the bench computed for an HF
row of the same shape (the same data; ours pads, which is not useful work): without an HF row
there is no MFU. The SM clock column is its median over the row's timed steps (nvidia-smi,
sampled by the bench): a power-capped GPU moved it 13% between calls of one hold (run 25), more
than most differences between setups, so a comparison is read beside it. The train loss (the
mean over every step the bench ran) compares numerics between rows of ours at one batch, which
see the same batches: run 27's lora_add_without_copy rows trained to 9.636 where Unsloth's add
gave 9.703. HF's rows record none. Give only files of one hold (one machine, held without a
break): ratios across holds mix machines.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from bench.train_speed import peak_flops


@dataclass(frozen=True)
class Row:
    """One mode's result in one invocation of bench/train_speed.py."""

    label: str
    shape: str
    batch: int
    samples_per_s: float
    median_step_ms: float | None
    peak_gib: float | None
    flops_per_sample: float | None
    gpu: str
    sm_mhz: float | None = None
    train_loss: float | None = None

    @property
    def median_rate(self) -> float | None:
        """Samples per second at the median step's pace."""
        return self.batch * 1000 / self.median_step_ms if self.median_step_ms else None


def read_rows(paths: list[Path]) -> list[Row]:
    """Every mode's result with a rate, in file and invocation order."""
    rows = []
    for path in paths:
        for inv in json.loads(path.read_text())["invocations"]:
            for label, r in inv["results"].items():
                if not r.get("samples_per_s"):
                    continue  # a mode that failed or only built the model
                rows.append(
                    Row(
                        label=label,
                        shape=inv["shape"],
                        batch=int(inv["batch"]),
                        samples_per_s=float(r["samples_per_s"]),
                        median_step_ms=r.get("median_step_ms"),
                        peak_gib=r.get("peak_gib"),
                        flops_per_sample=r.get("flops_per_sample"),
                        gpu=r.get("gpu") or inv.get("gpu", ""),
                        sm_mhz=r.get("conditions", {}).get("gpu_sm_mhz", {}).get("median"),
                        train_loss=r.get("train_loss"),
                    )
                )
    return rows


def markdown(rows: list[Row], baseline: str = "hf") -> str:
    """Every row against the fastest baseline row (labels starting with `baseline`; HF's by
    default) by rate and by median step, with MFU and peak memory."""
    baselines = [r for r in rows if r.label.startswith(baseline)]
    if not baselines:
        if baseline == "hf":
            raise SystemExit(
                "train_hold_ratios: no HF row (--modes hf) in these files: no baseline; "
                "--baseline LABEL takes one of ours"
            )
        labels = ", ".join(r.label for r in rows)
        raise SystemExit(f"train_hold_ratios: no row's label starts with {baseline!r} ({labels})")
    best = max(baselines, key=lambda r: r.samples_per_s)
    best_median = max((r.median_rate or 0.0) for r in baselines)
    # MFU from an HF row's FLOPs (ours pads), whichever row is the baseline
    flops = {
        r.shape: r.flops_per_sample for r in rows if r.label.startswith("hf") and r.flops_per_sample
    }
    name = "HF" if baseline == "hf" else "baseline"
    lines = [
        f"Fastest {name} row: {best.label} at batch {best.batch}, {best.samples_per_s:g} "
        f"samples/s ({best_median:.2f} by its median step).",
        "",
        f"| row | batch | samples/s | by median step | peak GiB | MFU | × {name} (rate) "
        f"| × {name} (medians) | SM MHz | train loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = flops.get(r.shape)
        mfu = f"{100 * r.samples_per_s * f / peak_flops(r.gpu):.1f}%" if f else "-"
        median = f"{r.median_rate:.2f}" if r.median_rate else "-"
        by_median = f"{r.median_rate / best_median:.2f}" if r.median_rate and best_median else "-"
        clock = f"{r.sm_mhz:g}" if r.sm_mhz else "-"
        loss = f"{r.train_loss:.4f}" if r.train_loss is not None else "-"
        lines.append(
            f"| {r.label} | {r.batch} | {r.samples_per_s:g} | {median} | {r.peak_gib} | {mfu} | "
            f"{r.samples_per_s / best.samples_per_s:.2f} | {by_median} | {clock} | {loss} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("inputs", nargs="+", type=Path, help="train_speed.py --out files of one hold")
    p.add_argument(
        "--baseline",
        default="hf",
        help="the baseline rows' label prefix (default: hf, the HF baseline's rows)",
    )
    a = p.parse_args()
    print(markdown(read_rows(a.inputs), a.baseline))


if __name__ == "__main__":
    main()
