"""What a run has done so far, read from its object storage alone (`vlm-ray status`).

Every stage commits its work under the run URI (manifests, commit markers, checkpoints), so the
state of a run, finished, still running or interrupted, can be read without the cluster that
runs it: from CI, a cron job, or a laptop pointed at the bucket. Nothing here writes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from vlm_ray import layout
from vlm_ray.config import JobSpec
from vlm_ray.data.shards import list_shards
from vlm_ray.durations import rough_duration
from vlm_ray.ledger import ShardLedger
from vlm_ray.storage import Store, open_store
from vlm_ray.train.checkpoints import completed_checkpoint_steps
from vlm_ray.train.metrics_log import read_metrics

State = Literal["done", "partial", "not started"]


@dataclass
class StageStatus:
    """One stage's state, a line for a person, and the numbers behind it."""

    stage: str
    state: State
    detail: str
    facts: dict[str, Any] = field(default_factory=dict)


def _prepare_status(store: Store) -> StageStatus:
    if store.exists(layout.PREPARED_MANIFEST):
        m = store.read_json(layout.PREPARED_MANIFEST)
        splits = m.get("splits", {})
        facts = {
            "rows_in": m.get("rows_in"),
            "rows_ok": m.get("rows_ok"),
            "rows_quarantined": m.get("rows_quarantined", 0),
            "splits": splits,
        }
        detail = (
            f"{m.get('rows_ok')} of {m.get('rows_in')} rows: {splits.get('train', 0)} train, "
            f"{splits.get('heldout', 0)} held-out; {facts['rows_quarantined']} quarantined"
        )
        if facts["rows_quarantined"]:
            detail += f" ({store.uri_of(layout.QUARANTINE)})"
        return StageStatus("prepare", "done", detail, facts)
    written = sum(len(list_shards(store, f"{layout.PREPARED}/{s}")) for s in layout.SPLITS)
    if written:
        return StageStatus(
            "prepare",
            "partial",
            f"{written} shards written, no manifest yet (running, or interrupted: re-run prepare)",
            {"shards_written": written},
        )
    return StageStatus("prepare", "not started", "no prepared shards")


def _train_status(store: Store, spec: JobSpec) -> StageStatus:
    if store.exists(layout.TRAIN_SUMMARY):
        s = store.read_json(layout.TRAIN_SUMMARY)
        facts = {
            k: s.get(k)
            for k in ("global_step", "final_loss", "samples_per_second", "engine", "model_uri")
        }
        loss = f", final loss {s['final_loss']:.4g}" if s.get("final_loss") is not None else ""
        return StageStatus(
            "train",
            "done",
            f"{s.get('global_step')} steps on {s.get('engine')}{loss} -> {s.get('model_uri')}",
            facts,
        )
    steps = completed_checkpoint_steps(store)
    # metrics.jsonl is rewritten every 30 s or so while training runs (train/metrics_log.py).
    logged = [r for r in read_metrics(store) if "loss" in r]
    if not steps and not logged:
        return StageStatus("train", "not started", "no checkpoint, no trained model")
    facts: dict[str, Any] = {}
    parts = []
    if logged:
        last = logged[-1]
        facts.update(last_logged_step=last["step"], last_loss=last["loss"])
        if spec.train.max_steps:
            where = f"step {last['step']}/{spec.train.max_steps}"
        elif last.get("epoch") is not None:
            where = (
                f"step {last['step']} (epoch {last['epoch']:.2f}/{spec.train.num_train_epochs:g})"
            )
        else:
            where = f"step {last['step']}"
        ago = max(0.0, time.time() - last["time"]) if "time" in last else None
        parts.append(
            f"{where} logged (loss {last['loss']:.4g}"
            + (f", {rough_duration(ago)} ago)" if ago is not None else ")")
        )
    if steps:
        facts["last_checkpoint_step"] = steps[-1]
        parts.append(f"last checkpoint at step {steps[-1]}")
    else:
        parts.append("no checkpoint yet")
    detail = "; ".join(parts) + " (running, or interrupted: re-running train resumes)"
    return StageStatus("train", "partial", detail, facts)


def _images_per_s(records: list[dict[str, Any]]) -> float | None:
    """Rows committed per second, from the first committed shard's start to the last commit
    (every actor together); None without the timing fields or with a span of zero."""
    timed = [r for r in records if "committed_at" in r and "seconds" in r]
    if not timed:
        return None
    start = min(r["committed_at"] - r["seconds"] for r in timed)
    span = max(r["committed_at"] for r in timed) - start
    return sum(r["rows"] for r in timed) / span if span > 0 else None


def _input_shards(store: Store, prefix: str) -> tuple[list[str], list[str]]:
    """The input shards under prefix, and the quarantine files of rows prepare rejected there."""
    from vlm_ray.stages.infer import input_quarantine_keys

    return list_shards(store, prefix), input_quarantine_keys(store, prefix)


def _predictions_progress(
    store: Store,
    inputs: list[str],
    quarantined: list[str],
    tags: list[str],
    job: str | None,
) -> tuple[State, dict[str, dict[str, Any]], list[str]]:
    """Per model tag, how many of the input shards have committed predictions: the overall
    state, the numbers per tag, and a phrase per tag (with rate and time left)."""
    from vlm_ray.stages.infer import shard_tasks

    per_tag, states, parts = {}, [], []
    for tag in tags:
        wanted = {t.shard_id for t in shard_tasks(inputs, tag, quarantined, job)}
        ledger = ShardLedger(store, layout.predictions_dir(tag, job))
        done = [r for r in ledger.records() if r["shard_id"] in wanted]
        per_tag[tag] = {
            "shards_done": len(done),
            "shards": len(wanted),
            "rows": sum(r["rows"] for r in done),
            "errors": sum(r["errors"] for r in done),
        }
        states.append("done" if len(done) == len(wanted) else "partial" if done else "not started")
        part = (
            f"{tag} {len(done)}/{len(wanted)} shards, {per_tag[tag]['rows']} rows "
            f"({per_tag[tag]['errors']} errors)"
        )
        rate = _images_per_s(done)
        if rate and states[-1] == "partial":
            per_tag[tag]["images_per_s"] = round(rate, 2)
            left_s = (len(wanted) - len(done)) * per_tag[tag]["rows"] / len(done) / rate
            part += f", {rate:.1f} images/s: {rough_duration(left_s)} of work left"
        parts.append(part)
    return _overall(states), per_tag, parts


def _overall(states: list[State]) -> State:
    if all(s == "done" for s in states):
        return "done"
    return "not started" if all(s == "not started" for s in states) else "partial"


def _infer_status(store: Store, spec: JobSpec) -> StageStatus:
    from vlm_ray.stages.infer import bulk_job, input_shards_prefix

    job = bulk_job(spec)
    prefix = input_shards_prefix(spec)
    inputs, quarantined = _input_shards(store, prefix)
    if not inputs and not quarantined:
        where = "run prepare" if spec.infer.source is None else "infer prepares infer.source first"
        return StageStatus("infer", "not started", f"no input shards yet ({where})")
    tags = list(spec.infer.models)
    state, per_tag, parts = _predictions_progress(store, inputs, quarantined, tags, job)
    detail = "; ".join(parts) + f" -> {store.uri_of(layout.predictions_root(job))}"
    facts = {"input": store.uri_of(prefix), "job": job, "models": per_tag}
    return StageStatus("infer", state, detail, facts)


def _bulk_status(store: Store, spec: JobSpec) -> StageStatus | None:
    """Every bulk job of the run (infer.source jobs under bulk/), when the spec names none;
    None when the run has none. Each job's models are those it has predictions for."""
    if spec.infer.source is not None:
        return None  # the infer line is that job's
    jobs = store.list_folders(layout.BULK)
    if not jobs:
        return None
    states, facts, unfinished = [], {}, []
    for job in jobs:
        tags = store.list_folders(layout.predictions_root(job))
        inputs, quarantined = _input_shards(store, f"{layout.bulk_input(job)}/all")
        state, per_tag, parts = _predictions_progress(store, inputs, quarantined, tags, job)
        states.append(state if tags else "not started")
        facts[job] = per_tag
        if states[-1] != "done":  # finished jobs are counted; the JSON has every job
            unfinished.append(f"{job}: " + ("; ".join(parts) if parts else "no predictions yet"))
    rows = sum(t["rows"] for per_tag in facts.values() for t in per_tag.values())
    detail = (
        f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}, {states.count('done')} done "
        f"({rows} rows predicted)"
        + "".join(f" | {line}" for line in unfinished)
        + f" -> {store.uri_of(layout.BULK)}"
    )
    return StageStatus("bulk", _overall(states), detail, {"jobs": facts})


def _evaluate_status(store: Store) -> StageStatus:
    if not store.exists(layout.EVAL_METRICS):
        return StageStatus("evaluate", "not started", "no eval/metrics.json")
    m = store.read_json(layout.EVAL_METRICS)
    metric = m.get("headline_metric", "cer")
    scores = {tag: v.get(metric) for tag, v in m.get("models", {}).items()}
    shown = ", ".join(f"{tag} {v:.4f}" for tag, v in scores.items() if v is not None)
    return StageStatus(
        "evaluate",
        "done",
        f"{metric}: {shown} on {m.get('rows')} rows -> {store.uri_of(layout.EVAL_REPORT)}",
        {"headline_metric": metric, "scores": scores, "rows": m.get("rows")},
    )


def _promote_status(store: Store, spec: JobSpec) -> StageStatus | None:
    """The retraining gate's decision on this run; None for a run that is no retraining (no
    promote.root set and no decision recorded beside it)."""
    from vlm_ray.stages.promote import promotion_root, read_champion, recorded_decision

    try:
        root = open_store(promotion_root(spec), spec.run.s3_endpoint_url)
    except ValueError:  # a run.uri without a parent folder, and no promote.root
        return None
    decision = recorded_decision(root, store.uri_of(""))
    if decision is None:
        if not spec.promote.root:
            return None
        champion = read_champion(root)
        current = champion.get("run") if champion else "none yet"
        return StageStatus(
            "promote", "not started", f"no decision on this run; champion: {current}"
        )
    # The reason names the scores it compared (champion's, or with none yet the base model's).
    detail = f"{decision['decision']}: {decision.get('reason')} -> {decision['record']}"
    facts = {
        k: decision.get(k)
        for k in ("decision", "metric", "challenger_score", "champion_score", "base_score")
    }
    return StageStatus("promote", "done", detail, facts)


def run_status(spec: JobSpec) -> dict[str, Any]:
    """Every stage's state for spec.run.uri, read from object storage only (the retraining gate's
    too, for a retraining run)."""
    store = open_store(spec.run.uri, spec.run.s3_endpoint_url)
    stages = [
        _prepare_status(store),
        _train_status(store, spec),
        _infer_status(store, spec),
        _evaluate_status(store),
    ]
    for extra in (_bulk_status(store, spec), _promote_status(store, spec)):
        if extra is not None:
            stages.append(extra)
    return {"run": store.uri_of(""), "stages": [asdict(s) for s in stages]}


def format_status(status: dict[str, Any]) -> str:
    """The status as a few aligned lines for a terminal."""
    lines = [f"run {status['run']}"]
    for s in status["stages"]:
        lines.append(f"  {s['stage']:<9} {s['state']:<12} {s['detail']}")
    return "\n".join(lines)
