"""Bar charts of one benchmark run's raw results, for docs/benchmarks.md.

    python bench/plot_results.py train bench/results/train/train_7b_run6.json docs/img/train_7b_run6.png
    python bench/plot_results.py train bench/results/train/run10/*.json docs/img/train_7b_run10.png
    python bench/plot_results.py infer bench/results/infer/infer_2b_run7.jsonl \
        bench/results/infer/infer_2b_run7_d.jsonl docs/img/infer_2b_run7.png
    python bench/plot_results.py split bench/results/train/run29c/r/lora_add_split_2b.jsonl \
        docs/img/lora_add_split_2b_run29.png
    python -m bench.plot_results holds "run 25=bench/results/train/run25*/r/train_7b.json" \
        "run 27=bench/results/train/run27[abd]/r/train_7b.json" docs/img/best_batch_by_hold.png

Every bar or point is a figure from the files given (train_speed.py's JSON, infer_speed.py's
and lora_add_training_split.py's JSON lines): nothing is typed in by hand, so a chart always
matches the tables made from the same files. `split` draws each way's loss minus float32's at
every step, one panel per seed. `holds` takes "NAME=GLOB" per hold (train_speed.py's JSON of
one hold each) and draws, hold by hold, our fastest row beside 3x the fastest HF row: the
best-batch target, read within each hold only.
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


def train_bars(path: Path) -> tuple[list[str], list[float], list[float], str, list[float | None]]:
    """(labels, samples/s, peak GiB, GPU, samples/s by the median step) of every mode of every
    invocation in a train_speed JSON; the last is None where the record has no median."""
    data = json.loads(path.read_text())
    labels, speed, memory, gpu, by_median = [], [], [], "", []
    for inv in data.get("invocations", [data]):
        gpu = gpu or inv.get("gpu", "").splitlines()[0]
        for mode, r in inv["results"].items():
            if r.get("samples_per_s"):
                labels.append(f"{train_label(mode)}\nbatch {inv['batch']}")
                speed.append(r["samples_per_s"])
                memory.append(r.get("peak_gib") or 0.0)
                median_ms = r.get("median_step_ms")
                by_median.append(inv["batch"] / (median_ms / 1e3) if median_ms else None)
    return labels, speed, memory, gpu, by_median


def infer_bars(paths: list[Path]) -> tuple[list[str], list[float], str]:
    """(labels, steady images/s, GPU) of every record in infer_speed JSON-lines files."""
    labels, speed, gpu = [], [], ""
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            gpu = gpu or r.get("gpu", "")
            switches = (
                (f"fp8 {r.get('fp8')}", r.get("fp8") not in (None, "off")),
                ("compiled LM", r.get("compile_language")),
                ("deferred stop", r.get("defer_stop_check")),
            )
            extras = [x for x, on in switches if on]
            if r["mode"] == "b":
                labels.append(f"(b) plain HF\nbatch {r['best_batch']}")
                speed.append(r["images_per_s"])
            elif r["mode"] == "s":  # our generation code in one process, predict_table's rate
                stream = "own" if r.get("preprocess_stream", "side") == "side" else "generation's"
                labels.append(
                    f"(s) one process, batch {r['batch']}\n{stream} stream {' '.join(extras)}"
                )
                speed.append(r["predict_table_images_per_s"])
            else:
                gpus = f"{r['gpus']} GPU{'s' if r['gpus'] > 1 else ''}"
                shared = r.get("gpus_per_actor", 1.0) < 1 or r.get("actors_per_gpu", 1) > 1
                if shared:  # actors share GPUs: the rate once all were warm
                    gpus += f", {r['actors']} actors"
                    # how they shared it (recorded since inference run 16), when all agree
                    sharing = set((r.get("gpu_sharing_by_actor") or {}).values())
                    if len(sharing) == 1 and None not in sharing:
                        gpus += f" ({sharing.pop()})"
                labels.append(f"({r['mode']}) pool, {gpus}\nbatch {r['batch']} {' '.join(extras)}")
                speed.append(r["images_per_s_all_warm"] if shared else r["images_per_s"])
    return labels, speed, gpu


# lora_add_training_split.py's ways, as the docs name them
_SPLIT_WAYS = {
    "fp32_eager": "float32, op by op",
    "unsloth_eager": "bf16 eager, Unsloth's add",
    "ours_eager": "bf16 eager, ours",
    "unsloth_compiled": "compiled, Unsloth's add",
    "ours_compiled": "compiled, ours",
}


def split_curves(paths: list[Path]) -> tuple[dict[int, dict[str, list[float]]], str, str]:
    """({seed: {way: loss − float32's loss at each step}}, size, device) from
    lora_add_training_split.py's JSON lines; a seed without its float32 row is left out."""
    losses: dict[int, dict[str, list[float]]] = {}
    size, device = "", ""
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            losses.setdefault(r["seed"], {})[r["way"]] = r["losses"]
            size, device = size or r.get("size", ""), device or r.get("device", "")
    curves = {}
    for seed, ways in sorted(losses.items()):
        reference = ways.get("fp32_eager")
        if reference is None:
            continue
        curves[seed] = {
            way: [x - ref for x, ref in zip(got, reference, strict=True)]
            for way, got in ways.items()
        }
    return curves, size, device


def _split_chart(paths: list[Path]):
    """One panel per seed: every way's loss minus float32's, step by step."""
    curves, size, device = split_curves(paths)
    if not curves:
        raise SystemExit(f"plot_results: no seed with a float32 row in {_files(paths)}")
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (seed, ways) in zip(axes[0], curves.items(), strict=True):
        for way, diff in ways.items():
            # the two eager adds agree to the bit: dashes keep the second one visible
            style = "--" if way == "ours_eager" else "-o"
            ax.plot(
                range(1, len(diff) + 1), diff, style, markersize=3, label=_SPLIT_WAYS.get(way, way)
            )
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_title(f"seed {seed}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss − float32's")
        ax.legend(fontsize=7)
    fig.suptitle(f"{_files(paths)}: the {size or '?'} shape on {device or '?'}")
    return fig


def hold_bests(holds: list[str]) -> list[tuple[str, float | None, float | None, str]]:
    """(name, our fastest samples/s, HF's fastest, GPU) per "NAME=GLOB" hold; None where the
    hold has no such row (run 29 ran no HF line)."""
    import glob

    from bench.train_hold_ratios import read_rows

    bests = []
    for hold in holds:
        name, sep, pattern = hold.partition("=")
        paths = sorted(Path(p) for p in glob.glob(pattern))
        if not sep or not paths:
            raise SystemExit(f"plot_results holds: {hold!r} is not NAME=GLOB matching files")
        rows = read_rows(paths)
        ours = [r.samples_per_s for r in rows if r.label.startswith("stage")]
        hf = [r.samples_per_s for r in rows if r.label.startswith("hf")]
        gpu = next((r.gpu.splitlines()[0] for r in rows if r.gpu), "")
        bests.append((name, max(ours, default=None), max(hf, default=None), gpu))
    return bests


def _holds_chart(holds: list[str]):
    """Per hold: our fastest row and 3x HF's fastest, side by side, the ratio over them."""
    bests = hold_bests(holds)
    fig, ax = plt.subplots(figsize=(1.6 * len(bests) + 2.5, 4))
    x = range(len(bests))
    width = 0.38
    ours = [b[1] or 0.0 for b in bests]
    target = [3 * b[2] if b[2] else 0.0 for b in bests]
    ax.bar([i - width / 2 for i in x], ours, width, color="tab:green", label="ours, fastest")
    ax.bar([i + width / 2 for i in x], target, width, color="tab:grey", label="3x HF's fastest")
    for i, (_, us, hf, _) in enumerate(bests):
        note = f"{us / hf:.2f}x" if us and hf else "no HF run"
        ax.annotate(note, (i, max(ours[i], target[i])), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [f"{b[0]}\n{b[3]}" for b in bests], fontsize=7)
    ax.set_ylabel("samples/s")
    ax.margins(y=0.15)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("best batch: ours against 3x HF's best, hold by hold")
    return fig


def _bars(
    ax, labels: list[str], values: list[float], unit: str, colour: str, inside: bool = False
) -> None:
    """Horizontal bars with their values; inside: the values in the bars (markers go at the ends)."""
    bars = ax.barh(range(len(values)), values, color=colour)
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    if not ax.yaxis_inverted():  # the first bar on top (axes sharing y share the inversion)
        ax.invert_yaxis()
    ax.set_xlabel(unit)
    if inside:
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=-22, color="white")
    else:
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
    p.add_argument("kind", choices=["train", "infer", "split", "holds"])
    p.add_argument("inputs", nargs="+", type=Path, help="result files, then the PNG to write")
    a = p.parse_args()
    *inputs, out = a.inputs
    if a.kind == "train":
        labels, speed, memory, gpu, by_median = [], [], [], "", []
        for path in inputs:  # one run's records may be split over several files
            more = train_bars(path)
            labels, speed, memory, gpu, by_median = (
                labels + more[0],
                speed + more[1],
                memory + more[2],
                gpu or more[3],
                by_median + more[4],
            )
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.6 * len(labels) + 1.5), sharey=True)
        # A rate and a median can disagree (run 23's HF: one 3.08 s step, median 0.81 s): both
        # are drawn, the bar over the timed window, the diamond by the median step.
        marks = [(y, v) for y, v in enumerate(by_median) if v is not None]
        _bars(left, labels, speed, "samples/s", "tab:green", inside=bool(marks))
        if marks:
            left.plot(
                [v for _, v in marks],
                [y for y, _ in marks],
                "kD",
                markersize=5,
                label="by the median step",
            )
            left.legend(fontsize=7, loc="lower right")
        _bars(right, labels, memory, "peak GPU memory, GiB", "tab:grey")
        fig.suptitle(f"{_files(inputs)} on {gpu}")
    elif a.kind == "split":
        fig = _split_chart(inputs)
    elif a.kind == "holds":
        fig = _holds_chart([str(h) for h in inputs])
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
