"""report.md: headline numbers and the run's spec first, then the plots, then example rows."""

from __future__ import annotations

from typing import Any

from vlm_ray.metrics import LOWER_IS_BETTER, METRICS
from vlm_ray.report.plots import label

TITLES = {
    "cer": "CER",
    "wer": "WER",
    "exact_match": "exact match",
    "bleu": "BLEU",
    "chrf": "chrF",
}


def format_value(metric: str, value: float | None) -> str:
    """A metric value as shown to people: fractions to 4 places, sacrebleu's 0-100 scores to 1."""
    if value is None:
        return "-"
    return f"{value:.1f}" if metric in ("bleu", "chrf") else f"{value:.4f}"


def headline_rows(metrics: dict[str, Any]) -> list[tuple[str, list[str], str]]:
    """(metric title, one value per model, change) for each metric, then the error counts.

    The change column is finetuned vs base when both were scored: signed
    difference and whether it is better.
    """
    models = metrics["models"]
    gains = metrics.get("improvement") or {}
    out = []
    for m in METRICS:
        arrow = "↓" if m in LOWER_IS_BETTER else "↑"
        star = " *" if m == metrics.get("headline_metric") else ""
        change = ""
        if m in gains:
            delta = models["finetuned"][m] - models["base"][m]
            verdict = "better" if gains[m] > 0 else ("same" if gains[m] == 0 else "worse")
            change = (
                f"{delta:+.4f} ({verdict})"
                if m not in ("bleu", "chrf")
                else f"{delta:+.1f} ({verdict})"
            )
        out.append(
            (f"{TITLES[m]} {arrow}{star}", [format_value(m, s[m]) for s in models.values()], change)
        )
    out.append(("rows with errors", [str(s["errors"]) for s in models.values()], ""))
    return out


def _cell(text: str | None, limit: int = 80) -> str:
    text = (text or "").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_report(
    metrics: dict[str, Any],
    spec_yaml: str,
    plots: dict[str, str],
    examples: list[dict[str, Any]],
    examples_png: str | None = None,
    title: str = "Evaluation report",
) -> str:
    """The markdown of report.md; `plots` maps a caption to a PNG file name beside the report."""
    tags = list(metrics["models"])
    lines = [
        f"# {title}",
        "",
        f"{metrics['rows']} held-out rows scored"
        + (
            f" ({metrics['unlabeled']} without a reference skipped)"
            if metrics.get("unlabeled")
            else ""
        )
        + f"; headline metric (*): **{metrics['headline_metric']}**. "
        "↓ lower is better, ↑ higher is better; CER/WER/exact match are fractions, BLEU/chrF 0-100.",
        "",
        "## Headline numbers",
        "",
    ]
    compared = "improvement" in metrics
    change_head = (" fine-tuned vs base |", "---|") if compared else ("", "")
    lines.append("| metric | " + " | ".join(label(t) for t in tags) + " |" + change_head[0])
    lines.append("|---|" + "---:|" * len(tags) + change_head[1])
    for name, values, change in headline_rows(metrics):
        lines.append(
            f"| {name} | " + " | ".join(values) + " |" + (f" {change} |" if compared else "")
        )
    norm = metrics.get("normalisation", {})
    if norm:
        lines += [
            "",
            "Normalisation before scoring: " + ", ".join(f"{k}={v}" for k, v in norm.items()) + ".",
        ]
    lines += ["", "## Job spec", "", "```yaml", spec_yaml.rstrip(), "```", "", "## Plots", ""]
    for caption, name in plots.items():
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    lines += ["## Examples", ""]
    if examples_png:
        lines += [f"![Examples]({examples_png})", ""]
    if examples:
        lines.append("| id | reference | " + " | ".join(f"{label(t)} (CER)" for t in tags) + " |")
        lines.append("|---|---|" + "---|" * len(tags))
        for ex in examples:
            cells = []
            for t in tags:
                m = ex["models"].get(t)
                if m is None:
                    cells.append("-")
                elif m.get("error"):
                    cells.append(f"ERROR: {_cell(m['error'])} ({m['cer']:.2f})")
                else:
                    cells.append(f"{_cell(m['prediction']) or '∅ (empty)'} ({m['cer']:.2f})")
            lines.append(
                f"| {_cell(ex['id'], 24)} | {_cell(ex['reference'])} | " + " | ".join(cells) + " |"
            )
    else:
        lines.append("No examples (eval.examples_in_report is 0).")
    return "\n".join(lines) + "\n"
