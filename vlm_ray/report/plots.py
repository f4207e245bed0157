"""The evaluation report's plots as PNG bytes (matplotlib, Agg: no display on cluster nodes).

Every function takes plain data and returns PNG bytes, so the caller writes
them to any Store (local folder or s3://) with no local path in between.
"""

from __future__ import annotations

import io
import textwrap
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

# One colour per model tag, the same in every plot.
_COLOURS = {"base": "tab:grey", "finetuned": "tab:green", "champion": "tab:blue"}
_LABELS = {"base": "base", "finetuned": "fine-tuned", "champion": "champion"}


def colour(tag: str) -> str:
    """The plot colour of a model tag."""
    return _COLOURS.get(tag, "tab:purple")


def label(tag: str) -> str:
    """How a model tag is named in plots and tables."""
    return _LABELS.get(tag, tag)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_cer_distribution(cer_by_model: dict[str, list[float]], clip: float = 1.0) -> bytes:
    """Histogram of per-row CER per model, overlaid; CER above `clip` is counted in the last bin."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    bins = np.linspace(0.0, clip, 21)
    for tag, values in cer_by_model.items():
        clipped = np.minimum(np.asarray(values, dtype=float), clip)
        mean = float(np.mean(values)) if values else float("nan")
        ax.hist(
            clipped,
            bins=bins,
            alpha=0.55,
            color=colour(tag),
            edgecolor="white",
            label=f"{label(tag)} (mean row CER {mean:.3f})",
        )
    ax.set_xlabel(f"character error rate per row (values above {clip:g} counted at {clip:g})")
    ax.set_ylabel("rows")
    ax.set_title("CER distribution over held-out rows (lower is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_error_by_length(
    ref_lengths: list[int], cer_by_model: dict[str, list[float]], buckets: int = 5
) -> bytes:
    """Mean CER per model in reference-length buckets (quantiles of length in characters)."""
    lengths = np.asarray(ref_lengths, dtype=float)
    if not len(lengths):
        raise ValueError("no rows to plot: pass at least one reference length")
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, buckets + 1)))
    # bucket i holds edges[i] <= length < edges[i+1]; the last one also holds the longest
    which = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, max(0, len(edges) - 2))
    used = sorted(set(which.tolist()))
    names, counts = [], []
    for i in used:
        inside = lengths[which == i]
        lo, hi = int(inside.min()), int(inside.max())
        names.append(f"{lo}" if lo == hi else f"{lo}-{hi}")
        counts.append(len(inside))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    width = 0.8 / max(1, len(cer_by_model))
    x = np.arange(len(used))
    for k, (tag, values) in enumerate(cer_by_model.items()):
        v = np.asarray(values, dtype=float)
        means = [float(v[which == i].mean()) for i in used]
        offset = (k - (len(cer_by_model) - 1) / 2) * width
        ax.bar(x + offset, means, width, color=colour(tag), label=label(tag))
    ax.set_xticks(x, [f"{n}\n({c} rows)" for n, c in zip(names, counts, strict=True)])
    ax.set_xlabel("reference length (characters, after normalisation)")
    ax.set_ylabel("mean CER of the rows")
    ax.set_title("Error by reference length (lower is better)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)


def plot_training_loss(records: list[dict[str, Any]]) -> bytes:
    """Training loss (and learning rate) against step, from <run>/train/metrics.jsonl records."""
    from vlm_ray.train.loss_plot import plot_loss

    return plot_loss(records, title="training loss of the fine-tuned model")


def _clip_text(text: str | None, width: int, lines: int) -> str:
    wrapped = textwrap.wrap(text or "∅ (empty)", width=width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return "\n".join(wrapped)


def plot_examples_grid(examples: list[dict[str, Any]], columns: int = 4) -> bytes:
    """A grid of example images, each with its reference and every model's prediction (and row CER) below.

    Each example: {"id", "image": PNG/JPEG bytes or None, "reference", "models": {tag: {"prediction", "cer", "error"}}}.
    """
    if not examples:
        raise ValueError("no examples to draw: pass at least one row")
    columns = max(1, min(columns, len(examples)))
    rows = -(-len(examples) // columns)
    n_models = max(len(e["models"]) for e in examples)
    text_lines = 2 * (1 + n_models)  # reference + each model, up to two wrapped lines each
    text_h = 0.17 * text_lines
    fig = plt.figure(figsize=(3.3 * columns, (2.0 + text_h) * rows), dpi=100)
    # Per example: an image panel above a text panel, so long text never covers the image.
    grid = fig.add_gridspec(2 * rows, columns, height_ratios=[2.0, text_h] * rows, hspace=0.08)
    for n, ex in enumerate(examples):
        r, c = divmod(n, columns)
        img_ax, txt_ax = fig.add_subplot(grid[2 * r, c]), fig.add_subplot(grid[2 * r + 1, c])
        # A thin frame instead of axes: white scans would vanish into the page.
        img_ax.set_xticks([])
        img_ax.set_yticks([])
        for spine in img_ax.spines.values():
            spine.set_color("lightgrey")
        txt_ax.axis("off")
        if ex.get("image"):
            img = Image.open(io.BytesIO(ex["image"]))
            img.thumbnail((320, 320))
            img_ax.imshow(img.convert("RGB"))
        else:
            img_ax.text(
                0.5, 0.5, "(image not in prepared/heldout)", ha="center", va="center", fontsize=8
            )
        img_ax.set_title(str(ex["id"])[:36], fontsize=8, color="dimgrey")
        parts = [f"reference: {_clip_text(ex['reference'], 30, 2)}"]
        for tag, m in ex["models"].items():
            text = f"ERROR: {m['error']}" if m.get("error") else m.get("prediction")
            parts.append(f"{label(tag)} (CER {m['cer']:.2f}):\n  {_clip_text(text, 30, 1)}")
        txt_ax.text(
            0.0,
            1.0,
            "\n".join(parts),
            transform=txt_ax.transAxes,
            va="top",
            ha="left",
            fontsize=8,
            family="monospace",
        )
    fig.suptitle("Examples: reference / base / fine-tuned", fontsize=11)
    fig.subplots_adjust(
        left=0.02, right=0.98, top=1 - 0.5 / fig.get_figheight(), bottom=0.02, wspace=0.08
    )
    return _png(fig)
