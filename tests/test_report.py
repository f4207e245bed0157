"""The report's parts: each plot is a real PNG a person can read, report.md comes in the promised order,
and the example rows are the ones worth a look."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw

from vlm_ray.report import plots
from vlm_ray.report.markdown import render_report
from vlm_ray.stages.evaluate import pick_examples


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        img.load()  # decodes the whole file: a truncated PNG fails here
        return img.size


def _digit_png(text: str) -> bytes:
    img = Image.new("RGB", (84, 56), "white")
    ImageDraw.Draw(img).text((8, 20), text, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


CER = {"base": [1.0, 0.8, 2.5, 0.6], "finetuned": [0.0, 0.1, 0.0, 0.3]}


def test_every_plot_is_a_whole_png_of_readable_size() -> None:
    examples = [
        {
            "id": f"row-{i}",
            "image": _digit_png(str(i)) if i else None,  # the first has no image: a placeholder
            "reference": str(i),
            "models": {
                "base": {"prediction": "", "cer": 1.0, "error": "could not decode"},
                "finetuned": {"prediction": str(i) * 40, "cer": 0.0, "error": None},
            },
        }
        for i in range(5)
    ]
    records = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-4} for s in range(1, 6)]
    drawn = {
        "cer": plots.plot_cer_distribution(CER),
        "length": plots.plot_error_by_length([1, 3, 5, 12], CER),
        "loss": plots.plot_training_loss(records),
        "grid": plots.plot_examples_grid(examples, columns=4),
    }
    for name, png in drawn.items():
        width, height = _png_size(png)
        assert width >= 600 and height >= 300, name
    # 5 examples in 4 columns: two rows of cells, so the grid is taller than one row's height
    assert _png_size(drawn["grid"])[1] > 500


def test_error_by_length_draws_when_every_reference_has_the_same_length() -> None:
    _png_size(plots.plot_error_by_length([3, 3, 3, 3], CER))


def test_plots_refuse_empty_input_with_a_reason() -> None:
    with pytest.raises(ValueError, match="no examples"):
        plots.plot_examples_grid([])
    with pytest.raises(ValueError, match="no rows"):
        plots.plot_error_by_length([], {"base": []})


def _metrics(tags: tuple[str, ...]) -> dict:
    scores = {"cer": 0.25, "wer": 0.5, "exact_match": 0.5, "bleu": 12.3, "chrf": 45.6, "errors": 0}
    out = {
        "rows": 2,
        "unlabeled": 1,
        "headline_metric": "wer",
        "models": dict.fromkeys(tags, scores),
    }
    if tags == ("base", "finetuned"):
        out["improvement"] = dict.fromkeys(("cer", "wer", "exact_match", "bleu", "chrf"), 0.0)
    return out


def test_report_opens_with_numbers_and_spec_then_plots_then_examples() -> None:
    example = {
        "id": "row-1",
        "reference": "a|b",
        "models": {
            "base": {"prediction": None, "cer": 1.0, "error": "timeout"},
            "finetuned": {"prediction": "a|b", "cer": 0.0, "error": None},
        },
    }
    md = render_report(
        _metrics(("base", "finetuned")),
        "run:\n  uri: s3://bucket/run\n",
        {"CER distribution": "cer_distribution.png"},
        [example],
        "examples.png",
    )
    sections = [
        "# Evaluation report",
        "## Headline numbers",
        "## Job spec",
        "## Plots",
        "## Examples",
    ]
    assert [md.index(s) for s in sections] == sorted(md.index(s) for s in sections)
    assert "2 held-out rows scored (1 without a reference skipped)" in md
    assert "| WER ↓ * | 0.5000 | 0.5000 | +0.0000 (same) |" in md  # headline metric starred
    assert "```yaml\nrun:\n  uri: s3://bucket/run\n```" in md
    assert "![CER distribution](cer_distribution.png)" in md and "![Examples](examples.png)" in md
    # a '|' inside a text must not split the markdown table row
    assert "| row-1 | a\\|b | ERROR: timeout (1.00) | a\\|b (0.00) |" in md


def test_report_of_a_single_model_has_no_comparison_column() -> None:
    md = render_report(_metrics(("base",)), "run: {}\n", {}, [])
    assert "| metric | base |\n" in md and "fine-tuned vs base" not in md
    assert "No examples" in md


def test_examples_are_the_biggest_gains_and_the_worst_remaining_rows() -> None:
    def row(rid: str, base: float, tuned: float) -> dict:
        return {"id": rid, "models": {"base": {"cer": base}, "finetuned": {"cer": tuned}}}

    per_row = [row("a", 0.1, 0.1), row("b", 1.0, 0.0), row("c", 0.5, 0.9), row("d", 0.2, 0.2)]
    picked = [r["id"] for r in pick_examples(per_row, ["base", "finetuned"], 2)]
    assert picked == ["b", "c"]  # b gained most; c is the fine-tuned model's worst
    assert len(pick_examples(per_row, ["base", "finetuned"], 10)) == 4
    assert pick_examples(per_row, ["base", "finetuned"], 0) == []
