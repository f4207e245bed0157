"""The loss curve of a training run as a PNG."""

from __future__ import annotations

import io
from typing import Any


def plot_loss(records: list[dict[str, Any]], title: str = "training loss") -> bytes:
    """PNG bytes of loss (and learning rate, on a second axis) against step, from metrics.jsonl records."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not points:
        raise ValueError("no 'loss' in the metrics records: nothing to plot")
    steps, losses = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, marker="o" if len(steps) < 40 else None, color="tab:blue", label="loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lrs = [(r["step"], r["learning_rate"]) for r in records if "learning_rate" in r]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs, strict=True), color="tab:orange", alpha=0.6, label="learning rate")
        ax2.set_ylabel("learning rate")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
