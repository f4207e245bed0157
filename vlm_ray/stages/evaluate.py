"""The evaluate stage: score every model's predictions of the held-out rows, side by side, and write a report.

Reads   <run>/predictions/<tag>/shard-*.jsonl (tags: base, finetuned, and any other, e.g. champion)
        <run>/prepared/heldout/shard-*.parquet (example images), <run>/train/metrics.jsonl (loss curve)
Writes  <run>/eval/per_row.jsonl, cer_distribution.png, error_by_length.png, train_loss.png,
        examples.png, report.md, and last metrics.json (what promotion and the pipeline read)

Rows are joined by id across models. A row a model could not predict (an
``error`` record, or no record at all) is scored as an empty prediction and
counted in that model's ``errors``; rows without a reference cannot be scored
and are counted as ``unlabeled``.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from vlm_ray import layout
from vlm_ray.config import JobSpec, spec_to_dict
from vlm_ray.data.shards import list_shards
from vlm_ray.metrics import METRICS, improvement, normalize_text, score_row, score_rows
from vlm_ray.operator_errors import MissingInputError
from vlm_ray.report import plots
from vlm_ray.report.markdown import headline_rows, render_report
from vlm_ray.storage import Store, open_store

log = logging.getLogger(__name__)

BASE, FINETUNED = "base", "finetuned"
PER_ROW = f"{layout.EVAL}/per_row.jsonl"


def list_model_tags(store: Store) -> list[str]:
    """Tags with a predictions shard under predictions/: base and finetuned first, then the rest sorted."""
    tags = set()
    for key in store.list(layout.PREDICTIONS):
        parts = key.split("/")
        if len(parts) == 3 and parts[2].startswith("shard-") and parts[2].endswith(".jsonl"):
            tags.add(parts[1])
    first = [t for t in (BASE, FINETUNED) if t in tags]
    return first + sorted(tags - set(first))


def read_predictions(store: Store, tag: str) -> dict[str, dict[str, Any]]:
    """id -> prediction record of one model, from every predictions/<tag>/shard-*.jsonl."""
    prefix = layout.predictions_dir(tag) + "/"
    records: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for key in sorted(store.list(prefix)):
        name = key[len(prefix) :]
        if "/" in name or not (name.startswith("shard-") and name.endswith(".jsonl")):
            continue
        for n, line in enumerate(store.read_text(key).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rid = str(rec["id"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{store.uri_of(key)} line {n}: not a predictions record with an 'id' ({err}); "
                    "delete the file and its _done/ marker and re-run infer"
                ) from None
            if rid in records:
                duplicates += 1
                continue
            records[rid] = rec
    if duplicates:
        log.warning("evaluate: %s has %d duplicate ids; kept the first of each", prefix, duplicates)
    return records


def load_example_images(store: Store, ids: list[str]) -> dict[str, bytes]:
    """id -> image bytes for the given ids, from the prepared held-out shards (only the rows asked for)."""
    wanted = set(ids)
    found: dict[str, bytes] = {}
    for key in list_shards(store, f"{layout.PREPARED}/heldout"):
        if not wanted - found.keys():
            break
        pf = pq.ParquetFile(io.BytesIO(store.read_bytes(key)))
        for g in range(pf.num_row_groups):
            # Read the small id column first; decode image bytes only for the rows asked for.
            id_col = pf.read_row_group(g, columns=["id"])["id"]
            mask = pc.is_in(id_col, value_set=pc.cast(list(wanted), id_col.type))
            if not pc.any(mask).as_py():
                continue
            rows = pf.read_row_group(g, columns=["id", "image"]).filter(mask).to_pylist()
            found.update({r["id"]: r["image"] for r in rows})
    return found


def pick_examples(per_row: list[dict[str, Any]], tags: list[str], n: int) -> list[dict[str, Any]]:
    """Up to n rows worth a look: half where fine-tuning gained most, half where it is still most wrong."""
    if n <= 0 or not per_row:
        return []
    focus = FINETUNED if FINETUNED in tags else tags[0]
    chosen: dict[str, dict[str, Any]] = {}
    if BASE in tags and focus != BASE:
        by_gain = sorted(
            per_row,
            key=lambda r: (r["models"][focus]["cer"] - r["models"][BASE]["cer"], r["id"]),
        )
        chosen.update((r["id"], r) for r in by_gain[: (n + 1) // 2])
    worst = sorted(per_row, key=lambda r: (-r["models"][focus]["cer"], r["id"]))
    for r in worst + per_row:
        if len(chosen) >= n:
            break
        chosen.setdefault(r["id"], r)
    return list(chosen.values())


def _score(
    spec: JobSpec, tags: list[str], preds: dict[str, dict[str, dict[str, Any]]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Corpus metrics per model and the per-row records, over the rows that have a reference."""
    ids = list(dict.fromkeys(rid for tag in tags for rid in preds[tag]))
    per_row: list[dict[str, Any]] = []
    unlabeled = 0
    for rid in ids:
        recs = [preds[t][rid] for t in tags if rid in preds[t]]
        reference = next((r["reference"] for r in recs if r.get("reference") is not None), None)
        if reference is None:
            unlabeled += 1
            continue
        row: dict[str, Any] = {
            "id": rid,
            "source_id": recs[0].get("source_id"),
            "reference": reference,
            "ref_chars": len(normalize_text(reference, spec.eval)),
            "models": {},
        }
        for tag in tags:
            rec = preds[tag].get(rid)
            error = (
                f"no prediction for this id under {layout.predictions_dir(tag)}/"
                if rec is None
                else rec.get("error")
            )
            prediction = None if error else rec.get("prediction")
            row["models"][tag] = {
                "prediction": prediction,
                "error": error,
                **score_row(prediction, reference, spec.eval),
            }
        per_row.append(row)
    if not per_row:
        raise ValueError(
            f"none of the {len(ids)} predicted rows has a reference: evaluation needs labeled rows; "
            "run infer on the prepared held-out split (leave infer.source unset)"
        )
    models = {}
    for tag in tags:
        scored = [r["models"][tag] for r in per_row]
        corpus = score_rows(
            [m["prediction"] or "" for m in scored], [r["reference"] for r in per_row], spec.eval
        )
        corpus["errors"] = sum(1 for m in scored if m["error"])
        models[tag] = corpus
    metrics: dict[str, Any] = {
        "rows": len(per_row),
        "unlabeled": unlabeled,
        "headline_metric": spec.eval.metric,
        "models": models,
        "normalisation": {
            "strip": spec.eval.strip,
            "collapse_whitespace": spec.eval.collapse_whitespace,
            "lowercase": spec.eval.lowercase,
        },
    }
    if BASE in models and FINETUNED in models:
        metrics["improvement"] = {
            m: improvement(m, models[BASE][m], models[FINETUNED][m]) for m in METRICS
        }
    return metrics, per_row


def _write_png(store: Store, name: str, png: bytes) -> str:
    store.write_bytes(f"{layout.EVAL}/{name}", png)
    return name


def _train_records(store: Store) -> list[dict[str, Any]]:
    if not store.exists(layout.TRAIN_METRICS):
        return []
    lines = store.read_text(layout.TRAIN_METRICS).splitlines()
    return [r for r in (json.loads(line) for line in lines if line.strip()) if "loss" in r]


def _write_report(
    spec: JobSpec, store: Store, tags: list[str], metrics: dict[str, Any], per_row: list[dict]
) -> list[str]:
    """Plots + report.md under eval/; returns the PNG names written."""
    cer_by_model = {t: [r["models"][t]["cer"] for r in per_row] for t in tags}
    figures = {
        "CER distribution, base vs fine-tuned": _write_png(
            store, "cer_distribution.png", plots.plot_cer_distribution(cer_by_model)
        ),
        "Error by reference length": _write_png(
            store,
            "error_by_length.png",
            plots.plot_error_by_length([r["ref_chars"] for r in per_row], cer_by_model),
        ),
    }
    records = _train_records(store)
    if records:
        figures["Training loss"] = _write_png(
            store, "train_loss.png", plots.plot_training_loss(records)
        )
    examples = pick_examples(per_row, tags, spec.eval.examples_in_report)
    examples_png = None
    if examples:
        images = load_example_images(store, [e["id"] for e in examples])
        for e in examples:
            e["image"] = images.get(e["id"])
        examples_png = _write_png(store, "examples.png", plots.plot_examples_grid(examples))
    spec_yaml = yaml.safe_dump(spec_to_dict(spec), sort_keys=False)
    title = f"Evaluation report: {spec.run.name or spec.run.uri.rstrip('/').rsplit('/', 1)[-1]}"
    store.write_text(
        layout.EVAL_REPORT,
        render_report(metrics, spec_yaml, figures, examples, examples_png, title=title),
    )
    return [*figures.values(), *([examples_png] if examples_png else [])]


def run_evaluate(spec: JobSpec) -> dict[str, Any]:
    """Score every model's held-out predictions; write eval/metrics.json, per_row.jsonl, report.md, PNGs."""
    start = time.time()
    store = open_store(spec.run.uri, spec.run.s3_endpoint_url)
    tags = list_model_tags(store)
    log.info("evaluate: start, models %s under %s", tags, store.uri_of(layout.PREDICTIONS))
    if not tags:
        raise MissingInputError(
            f"no predictions under {store.uri_of(layout.PREDICTIONS)}/<tag>/shard-*.jsonl: "
            "run the infer stage first"
        )
    preds = {tag: read_predictions(store, tag) for tag in tags}
    metrics, per_row = _score(spec, tags, preds)
    for tag in tags:
        missing = sum(1 for r in per_row if r["models"][tag]["error"] and r["id"] not in preds[tag])
        if missing:
            log.warning(
                "evaluate: %s has no prediction for %d of %d rows", tag, missing, len(per_row)
            )
    store.write_text(PER_ROW, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_row))
    pngs = _write_report(spec, store, tags, metrics, per_row)
    metrics["report"] = store.uri_of(layout.EVAL_REPORT)
    # metrics.json last: it is what promotion and the pipeline read as "evaluated".
    store.write_json(layout.EVAL_METRICS, metrics)
    log.info(
        "evaluate: done in %.1f s: %d rows (%d unlabeled), %s=%s, %d plots -> %s",
        time.time() - start,
        metrics["rows"],
        metrics["unlabeled"],
        spec.eval.metric,
        {t: round(m[spec.eval.metric], 4) for t, m in metrics["models"].items()},
        len(pngs),
        store.uri_of(layout.EVAL),
    )
    return metrics


def format_summary_table(metrics: dict[str, Any]) -> str:
    """A fixed-width table (metric | base | fine-tuned | change) for the end of the demo."""
    tags = list(metrics["models"])
    rows = headline_rows(metrics)
    compared = "improvement" in metrics
    header = ["metric", *(plots.label(t) for t in tags), "fine-tuned vs base" if compared else ""]
    table = [header] + [[name, *values, change] for name, values, change in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for n, r in enumerate(table):
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1], strict=True)
        ]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return (
        f"{metrics['rows']} held-out rows, headline metric (*): {metrics['headline_metric']}\n"
        + "\n".join(lines)
    )
