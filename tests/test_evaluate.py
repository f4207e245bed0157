"""The evaluate stage over predictions files in a local folder and on a real S3 server:
base and fine-tuned joined by id, scored, and written as metrics.json, per_row.jsonl, report.md and PNGs."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from vlm_ray import layout
from vlm_ray.config import JobSpec, parse_spec
from vlm_ray.stages.evaluate import format_summary_table, run_evaluate
from vlm_ray.storage import S3Store, Store


def _spec(store: Store, **eval_opts: object) -> JobSpec:
    endpoint = store.endpoint_url if isinstance(store, S3Store) else None
    return parse_spec(
        {
            "run": {"uri": store.uri, "s3_endpoint_url": endpoint},
            "model": {"name": "tiny"},
            "data": {"source": "digits.jsonl"},
            "eval": {"examples_in_report": 4, **eval_opts},
        }
    )


def _write_predictions(store: Store, tag: str, rows: list[dict], per_shard: int = 3) -> None:
    for s, start in enumerate(range(0, len(rows), per_shard)):
        lines = "".join(json.dumps(r) + "\n" for r in rows[start : start + per_shard])
        store.write_text(f"{layout.predictions_dir(tag)}/{layout.shard_name(s, 'jsonl')}", lines)


def _rec(rid: str, reference: str | None, prediction: str, error: str | None = None) -> dict:
    return {
        "id": rid,
        "source_id": rid,
        "prompt": "Read the number in this image.",
        "prediction": "" if error else prediction,
        "reference": reference,
        "tokens": 3,
        "latency_s": 0.01,
        "error": error,
    }


@pytest.fixture
def predicted_run(store: Store, write_prepared) -> Store:
    """Six held-out rows (references "102".."107") with images, predicted by base and fine-tuned.

    base: row-0002 failed (error), the others read "10" (1 edit each): CER (3 + 5) / 18.
    finetuned: all right but row-0007, read "10x" (1 edit): CER 1 / 18, exact match 5/6.
    """
    recs = write_prepared(store, rows=2, heldout=6)
    heldout = [(r["id"], r["text"]) for r in recs if r["id"] >= "row-0002"]
    base = [
        _rec(rid, ref, "10", error="image could not be decoded" if rid == "row-0002" else None)
        for rid, ref in heldout
    ]
    tuned = [_rec(rid, ref, "10x" if rid == "row-0007" else ref) for rid, ref in heldout]
    _write_predictions(store, "base", base)
    _write_predictions(store, "finetuned", list(reversed(tuned)))  # joined by id, not by order
    store.write_text(
        layout.TRAIN_METRICS,
        "".join(
            json.dumps({"step": s, "loss": 3.0 / s, "learning_rate": 2e-4 * (1 - s / 10)}) + "\n"
            for s in range(1, 9)
        ),
    )
    return store


def _assert_png(store: Store, name: str) -> None:
    data = store.read_bytes(f"{layout.EVAL}/{name}")
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.width > 300 and img.height > 200, name


def test_base_and_finetuned_are_scored_side_by_side_with_report_and_plots(
    predicted_run: Store,
) -> None:
    store = predicted_run
    metrics = run_evaluate(_spec(store))

    assert store.read_json(layout.EVAL_METRICS) == metrics
    assert metrics["rows"] == 6 and metrics["headline_metric"] == "cer"
    base, tuned = metrics["models"]["base"], metrics["models"]["finetuned"]
    assert base["cer"] == pytest.approx(8 / 18) and base["errors"] == 1
    assert tuned["cer"] == pytest.approx(1 / 18) and tuned["errors"] == 0
    assert (base["exact_match"], tuned["exact_match"]) == (0.0, pytest.approx(5 / 6))
    assert set(base) >= {"cer", "wer", "exact_match", "bleu", "chrf", "rows", "errors"}
    assert metrics["improvement"]["cer"] == pytest.approx(7 / 18)  # positive: fine-tuned is better
    assert metrics["improvement"]["exact_match"] == pytest.approx(5 / 6)

    per_row = [json.loads(x) for x in store.read_text("eval/per_row.jsonl").splitlines()]
    assert [r["id"] for r in per_row] == [f"row-{i:04d}" for i in range(2, 8)]
    failed = per_row[0]["models"]["base"]
    assert failed["error"] == "image could not be decoded" and failed["cer"] == 1.0

    report = store.read_text(layout.EVAL_REPORT)
    order = [
        report.index(s) for s in ("## Headline numbers", "## Job spec", "## Plots", "## Examples")
    ]
    assert order == sorted(order)
    assert "| CER ↓ * | 0.4444 | 0.0556 | -0.3889 (better) |" in report
    assert f"uri: {store.uri}" in report  # the run's spec, as YAML
    for name in ("cer_distribution.png", "error_by_length.png", "train_loss.png", "examples.png"):
        assert f"]({name})" in report
        _assert_png(store, name)


def test_a_row_one_model_did_not_predict_counts_as_its_error(tmp_path, write_prepared) -> None:
    from vlm_ray.storage import LocalStore

    store = LocalStore(tmp_path / "run")
    _write_predictions(store, "base", [_rec("a", "12", "12"), _rec("b", "34", "34")])
    _write_predictions(store, "finetuned", [_rec("a", "12", "12")])
    metrics = run_evaluate(_spec(store, metric="exact_match", examples_in_report=0))
    assert metrics["rows"] == 2
    assert metrics["models"]["finetuned"]["errors"] == 1
    assert metrics["models"]["finetuned"]["exact_match"] == 0.5
    assert metrics["improvement"]["exact_match"] == -0.5
    assert not store.exists("eval/examples.png")
    assert not store.exists("eval/train_loss.png")  # this run did not train


def test_only_base_predictions_and_unlabeled_rows_still_evaluate(tmp_path) -> None:
    from vlm_ray.storage import LocalStore

    store = LocalStore(tmp_path / "run")
    _write_predictions(
        store, "base", [_rec("a", "Hello", "hello "), _rec("b", None, "a cat"), _rec("c", "x", "y")]
    )
    metrics = run_evaluate(_spec(store, lowercase=True))
    assert list(metrics["models"]) == ["base"] and "improvement" not in metrics
    assert (metrics["rows"], metrics["unlabeled"]) == (2, 1)
    assert metrics["models"]["base"]["exact_match"] == 0.5
    # no prepared shards: the example grid still draws, with a placeholder for each image
    _assert_png(store, "examples.png")
    table = format_summary_table(metrics)
    assert "base" in table and "fine-tuned" not in table.splitlines()[1]


def test_evaluating_before_infer_says_to_run_infer(tmp_path) -> None:
    from vlm_ray.storage import LocalStore

    with pytest.raises(FileNotFoundError, match="run the infer stage first"):
        run_evaluate(_spec(LocalStore(tmp_path / "run")))


def test_summary_table_lines_up_metric_base_finetuned_and_change() -> None:
    metrics = {
        "rows": 6,
        "headline_metric": "cer",
        "models": {
            "base": {
                "cer": 0.5,
                "wer": 1.0,
                "exact_match": 0.0,
                "bleu": 0.0,
                "chrf": 10.0,
                "errors": 1,
            },
            "finetuned": {
                "cer": 0.1,
                "wer": 0.2,
                "exact_match": 0.8,
                "bleu": 60.0,
                "chrf": 80.0,
                "errors": 0,
            },
        },
        "improvement": {"cer": 0.4, "wer": 0.8, "exact_match": 0.8, "bleu": 60.0, "chrf": 70.0},
    }
    lines = format_summary_table(metrics).splitlines()
    assert lines[0] == "6 held-out rows, headline metric (*): cer"
    assert lines[1].split() == ["metric", "base", "fine-tuned", "fine-tuned", "vs", "base"]
    cer = next(line for line in lines if line.startswith("CER"))
    assert cer.split() == ["CER", "↓", "*", "0.5000", "0.1000", "-0.4000", "(better)"]
    end = lines[1].index("base") + len("base")  # values right-aligned under their header
    assert all(line[end - 1] != " " and line[end] == " " for line in lines[3:])
