"""Bar charts of one benchmark run's raw results, for docs/benchmarks.md.

    python bench/plot_results.py train bench/results/train/train_7b_run6.json docs/img/train_7b_run6.png
    python bench/plot_results.py train bench/results/train/run10/*.json docs/img/train_7b_run10.png
    python bench/plot_results.py infer bench/results/infer/infer_2b_run7.jsonl \
        bench/results/infer/infer_2b_run7_d.jsonl docs/img/infer_2b_run7.png

Every bar is a figure from the files given (train_speed.py's JSON, infer_speed.py's JSON lines):
nothing is typed in by hand, so a chart always matches the tables made from the same files.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# train_speed.py's modes; its --label suffix describes the stage's overrides (hf is always 16-bit)
_TRAIN_MODES = {
    "hf": "(a) HF + PEFT + TRL, 16-bit",
    "unsloth": "(b) Unsloth notebook, 16-bit",
    "unsloth4": "(b) Unsloth notebook, 4-bit",
    "stage": "(c) our stage",
}


def train_label(mode: str) -> str:
    """A bar's name: the mode's setup, with the label's overrides for the stage."""
    name, _, suffix = mode.partition("[")
    if name == "stage" and suffix:
        return f"{_TRAIN_MODES[name]} [{suffix}"
    return _TRAIN_MODES.get(name, mode)


def train_bars(path: Path) -> tuple[list[str], list[float], list[float], str]:
    """(labels, samples/s, peak GiB, GPU) of every mode of every invocation in a train_speed JSON."""
    data = json.loads(path.read_text())
    labels, speed, memory, gpu = [], [], [], ""
    for inv in data.get("invocations", [data]):
        gpu = gpu or inv.get("gpu", "").splitlines()[0]
        for mode, r in inv["results"].items():
            if r.get("samples_per_s"):
                labels.append(f"{train_label(mode)}\nbatch {inv['batch']}")
                speed.append(r["samples_per_s"])
                memory.append(r.get("peak_gib") or 0.0)
    return labels, speed, memory, gpu


def infer_bars(paths: list[Path]) -> tuple[list[str], list[float], str]:
    """(labels, steady images/s, GPU) of every record in infer_speed JSON-lines files."""
    labels, speed, gpu = [], [], ""
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            gpu = gpu or r.get("gpu", "")
            if r["mode"] == "b":
                labels.append(f"(b) plain HF\nbatch {r['best_batch']}")
            else:
                extras = [x for x, on in (("fp8", r.get("fp8") not in (None, "off")),) if on]
                gpus = f"{r['gpus']} GPU{'s' if r['gpus'] > 1 else ''}"
                labels.append(f"({r['mode']}) pool, {gpus}\nbatch {r['batch']} {' '.join(extras)}")
            speed.append(r["images_per_s"])
    return labels, speed, gpu


def _bars(ax, labels: list[str], values: list[float], unit: str, colour: str) -> None:
    bars = ax.barh(range(len(values)), values, color=colour)
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    if not ax.yaxis_inverted():  # the first bar on top (axes sharing y share the inversion)
        ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.margins(x=0.15)


def _files(paths: list[Path]) -> str:
    """A title's name for the result files: the file, or their common folder and how many."""
    if len(paths) == 1:
        return paths[0].name
    return f"{Path(os.path.commonpath(paths))} ({len(paths)} files)"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("kind", choices=["train", "infer"])
    p.add_argument("inputs", nargs="+", type=Path, help="result files, then the PNG to write")
    a = p.parse_args()
    *inputs, out = a.inputs
    if a.kind == "train":
        labels, speed, memory, gpu = [], [], [], ""
        for path in inputs:  # one run's records may be split over several files
            more = train_bars(path)
            labels, speed, memory, gpu = (
                labels + more[0],
                speed + more[1],
                memory + more[2],
                gpu or more[3],
            )
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.6 * len(labels) + 1.5), sharey=True)
        _bars(left, labels, speed, "samples/s", "tab:green")
        _bars(right, labels, memory, "peak GPU memory, GiB", "tab:grey")
        fig.suptitle(f"{_files(inputs)} on {gpu}")
    else:
        labels, speed, gpu = infer_bars(inputs)
        fig, ax = plt.subplots(figsize=(7, 0.6 * len(labels) + 1.5))
        _bars(ax, labels, speed, "images/s (steady)", "tab:blue")
        fig.suptitle(f"{_files(inputs)} on {gpu}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
