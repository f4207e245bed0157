"""The prepare stage: a data source → training-ready parquet shards, a quarantine, and a manifest.

The driver streams the source into deterministic input shards and keeps at
most `ray.max_in_flight` Ray tasks running (backpressure, flat memory). One
input shard → one task → one output shard per split (written atomically) +
that shard's quarantine file → one commit marker. A re-run skips committed
shards; Ray's task retries redo a shard whose worker died; the output of an
interrupted and resumed run equals a clean run's, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray

from vlm_ray import layout
from vlm_ray.config import JobSpec, spec_to_dict
from vlm_ray.data.examples import ColumnMap, RowRejected, build_example
from vlm_ray.data.model_limits import ModelLimits, model_limits
from vlm_ray.data.quarantine import quarantine_record, write_quarantine
from vlm_ray.data.shards import write_shard
from vlm_ray.data.sources import (
    InputShard,
    Source,
    iter_input_shards,
    locate_source,
    read_input_shard,
)
from vlm_ray.ledger import ShardLedger
from vlm_ray.operator_errors import RunConflictError, elsewhere
from vlm_ray.ray_cluster import cluster_cpus, init_ray
from vlm_ray.storage import open_store

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class PrepareJob:
    """Everything a worker needs to prepare one input shard (shipped once through the object store)."""

    run_uri: str
    endpoint_url: str | None
    out_prefix: str
    source: Source
    columns: ColumnMap
    limits: ModelLimits
    heldout_fraction: float | None
    dedup: bool
    fingerprint: str

    @property
    def splits(self) -> tuple[str, ...]:
        return layout.SPLITS if self.heldout_fraction is not None else ("all",)


def shard_id(index: int) -> str:
    """shard-00012: the name of an input shard, its outputs and its commit marker."""
    return layout.shard_name(index, "")[:-1]


def split_of(row_id: str, heldout_fraction: float | None) -> str:
    """train or heldout from a hash of the row's identity: stable across re-runs and worker counts."""
    if heldout_fraction is None:
        return "all"
    bucket = int(hashlib.sha256(f"split:{row_id}".encode()).hexdigest()[:15], 16) / 16**15
    return "heldout" if bucket < heldout_fraction else "train"


def prepare_shard(job: PrepareJob, shard: InputShard) -> dict:
    """Prepare one input shard: write its output shard per split and its quarantine, then commit; returns the record."""
    store = open_store(job.run_uri, job.endpoint_url)
    ledger = ShardLedger(store, job.out_prefix)
    sid = shard_id(shard.index)
    if ledger.is_done(sid):  # a retry of an attempt that got as far as committing
        return store.read_json(f"{job.out_prefix}/_done/{sid}.json")
    rows: dict[str, list[dict]] = {s: [] for s in job.splits}
    rejected: list[dict] = []
    seen: dict[str, str] = {}
    rows_in = 0
    for raw in read_input_shard(job.source, shard):
        rows_in += 1
        try:
            ex = build_example(raw, job.source, job.columns, job.limits)
            if job.dedup:
                if ex.content_hash in seen:
                    raise RowRejected(
                        f"duplicate: same image and text as source_id {seen[ex.content_hash]} (data.dedup)"
                    )
                seen[ex.content_hash] = raw.source_id
        except RowRejected as err:
            rejected.append(quarantine_record(raw.source_id, err.reason, **raw.where))
            continue
        rows[split_of(ex.row["id"], job.heldout_fraction)].append(ex.row)

    outputs = []
    for split, split_rows in rows.items():
        if split_rows:
            key = f"{job.out_prefix}/{split}/{layout.shard_name(shard.index)}"
            outputs.append({"split": split, **write_shard(store, key, split_rows)})
    quarantine_key = None
    if rejected:
        quarantine_key = f"{job.out_prefix}/quarantine/{layout.shard_name(shard.index, 'jsonl')}"
        write_quarantine(store, quarantine_key, rejected)
    record = {
        "input_shard": shard.index,
        "first_row": shard.start,
        "rows_in": rows_in,
        "rows_ok": rows_in - len(rejected),
        "rows_quarantined": len(rejected),
        "outputs": outputs,
        "quarantine": quarantine_key,
        "reasons": reason_counts(rejected),
        "fingerprint": job.fingerprint,
        "input_digest": shard.digest(),
    }
    if not ledger.commit(sid, record):  # another attempt committed the same bytes first
        return store.read_json(f"{job.out_prefix}/_done/{sid}.json")
    return record


def reason_counts(rejected: list[dict]) -> dict[str, int]:
    """Rejections by kind (the reason up to its first colon: "truncated PNG", "missing file", ...)."""
    counts: dict[str, int] = {}
    for r in rejected:
        kind = r["reason"].split(":", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


_prepare_shard_task = ray.remote(prepare_shard)


def run_prepare(spec: JobSpec) -> dict:
    """Prepare spec.data.source into <run>/prepared/ (train + heldout); returns the manifest."""
    return prepare_dataset(
        spec, spec.data.source, spec.data.format, layout.PREPARED, spec.data.heldout_fraction
    )


def prepare_dataset(
    spec: JobSpec,
    source: str,
    fmt: str,
    out_prefix: str,
    heldout_fraction: float | None,
    require_text: bool = True,
    prompt: str | None = None,
    rows_per_shard: int | None = None,
) -> dict:
    """Prepare any source into <run>/<out_prefix>/{train,heldout | all}/ shards; returns (and writes) the manifest."""
    start = time.time()
    init_ray(spec.ray)
    endpoint = spec.run.s3_endpoint_url
    store = open_store(spec.run.uri, endpoint)
    rows_per_shard = rows_per_shard or spec.data.rows_per_shard
    src = locate_source(source, fmt, endpoint, spec.data.split)
    d = spec.data
    columns = ColumnMap(
        image_column=d.image_column,
        text_column=d.text_column,
        prompt=prompt or d.prompt,
        prompt_column=None if prompt else d.prompt_column,
        system_prompt=d.system_prompt,
        id_column=d.id_column,
        require_text=require_text,
    )
    limits = model_limits(spec)
    fingerprint = _fingerprint(src, columns, limits, heldout_fraction, rows_per_shard, spec)
    job = PrepareJob(
        spec.run.uri,
        endpoint,
        out_prefix,
        src,
        columns,
        limits,
        heldout_fraction,
        d.dedup,
        fingerprint,
    )
    ledger = ShardLedger(store, out_prefix)
    # One small record per committed shard (never rows): checked against the source as it is now.
    committed = {r["shard_id"]: r for r in ledger.records()}
    _refuse_mixed_outputs(store, out_prefix, committed, fingerprint)
    log.info(
        "prepare: start %s (%s) -> %s; %d rows per shard, %d shards already done",
        src.given,
        src.fmt,
        store.uri_of(out_prefix),
        rows_per_shard,
        len(committed),
    )

    max_in_flight = spec.ray.max_in_flight or 2 * cluster_cpus()
    task = _prepare_shard_task.options(
        max_retries=spec.ray.max_retries, num_cpus=spec.ray.num_cpus_per_task
    )
    job_ref = ray.put(job)
    progress = _Progress(start)
    pending: dict[Any, int] = {}
    skipped = 0
    for shard in iter_input_shards(src, rows_per_shard, d.max_rows):
        done = committed.get(shard_id(shard.index))
        if done is not None:
            if done.get("input_digest") != shard.digest():
                raise PreparedConflictError(
                    f"input shard {shard.index} (rows {shard.start}..) of {src.given} is not what was "
                    f"prepared into {store.uri_of(out_prefix)}: the source changed since. Resume only "
                    f"with an unchanged source; otherwise use {elsewhere(out_prefix)} or delete the "
                    "old output"
                )
            skipped += 1
            continue
        while (
            len(pending) >= max_in_flight
        ):  # backpressure: the source is read no faster than workers finish
            _collect(pending, progress)
        pending[task.remote(job_ref, shard)] = shard.index
    while pending:
        _collect(pending, progress)

    manifest = build_manifest(ledger.records(), spec, src, out_prefix, heldout_fraction, limits)
    store.write_json(f"{out_prefix}/manifest.json", manifest)
    log.info(
        "prepare: done in %.1f s: %d rows in, %d ok, %d quarantined; %d shards (%d run, %d skipped) -> %s",
        time.time() - start,
        manifest["rows_in"],
        manifest["rows_ok"],
        manifest["rows_quarantined"],
        len(manifest["shards"]),
        progress.shards,
        skipped,
        store.uri_of(f"{out_prefix}/manifest.json"),
    )
    if manifest["rows_quarantined"]:
        top = ", ".join(f"{k} x{n}" for k, n in list(manifest["quarantine_reasons"].items())[:5])
        log.warning(
            "prepare: %d rows quarantined (%s); one line per row with its reason under %s",
            manifest["rows_quarantined"],
            top,
            store.uri_of(f"{out_prefix}/quarantine/"),
        )
    if not manifest["rows_ok"]:
        log.warning(
            "prepare: no usable rows in %s; check data.image_column / data.text_column and the quarantine",
            src.given,
        )
    return manifest


def _collect(pending: dict[Any, int], progress: _Progress) -> None:
    """Wait for the next finished task and account for it; a shard that failed all retries stops the stage."""
    ready, _ = ray.wait(list(pending), num_returns=1)
    for ref in ready:
        index = pending.pop(ref)
        try:
            record = ray.get(ref)
        except ray.exceptions.RayError as err:
            raise RuntimeError(
                f"prepare: input shard {shard_id(index)} failed after its retries: {err}"
            ) from err
        progress.add(record)


class _Progress:
    """Periodic log line with rows/s and quarantined count (one line per PROGRESS_EVERY_S)."""

    def __init__(self, start: float):
        self.start = self.last = start
        self.shards = self.rows = self.quarantined = 0

    def add(self, record: dict) -> None:
        self.shards += 1
        self.rows += record["rows_in"]
        self.quarantined += record["rows_quarantined"]
        now = time.time()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            log.info(
                "prepare: %d shards, %d rows (%.0f rows/s), %d quarantined",
                self.shards,
                self.rows,
                self.rows / max(now - self.start, 1e-9),
                self.quarantined,
            )


def build_manifest(
    records: list[dict],
    spec: JobSpec,
    src: Source,
    out_prefix: str,
    heldout_fraction: float | None,
    limits: ModelLimits,
) -> dict:
    """Aggregate the shards' commit records (timestamps left out, so a re-run writes the same manifest)."""
    records = sorted(records, key=lambda r: r["input_shard"])
    shards = [{**o, "input_shard": r["input_shard"]} for r in records for o in r["outputs"]]
    shards.sort(key=lambda s: (s["split"], s["key"]))
    splits: dict[str, int] = {}
    for s in shards:
        splits[s["split"]] = splits.get(s["split"], 0) + s["rows"]
    rows_in = sum(r["rows_in"] for r in records)
    rows_ok = sum(r["rows_ok"] for r in records)
    rows_q = sum(r["rows_quarantined"] for r in records)
    reasons: dict[str, int] = {}
    for r in records:
        for kind, n in r.get("reasons", {}).items():
            reasons[kind] = reasons.get(kind, 0) + n
    assert rows_in == rows_ok + rows_q, "every input row is either prepared or quarantined"
    return {
        "rows_in": rows_in,
        "rows_ok": rows_ok,
        "rows_quarantined": rows_q,
        "splits": splits,
        "heldout_fraction": heldout_fraction,
        "shards": shards,
        "input_shards": len(records),
        "quarantine": [r["quarantine"] for r in records if r["quarantine"]],
        "quarantine_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "source": {"uri": src.given, "format": src.fmt, "split": src.split},
        "out_prefix": out_prefix,
        "image_rules": asdict(limits.image_rules),
        "model_family": limits.family,
        "spec": spec_to_dict(spec),
    }


def _fingerprint(
    src: Source,
    columns: ColumnMap,
    limits: ModelLimits,
    heldout_fraction: float | None,
    rows_per_shard: int,
    spec: JobSpec,
) -> str:
    """What decides the bytes of the outputs: if it changes, old shards must not be mixed with new ones."""
    what = {
        "source": [src.name, src.fmt, list(src.files), src.split],
        "columns": asdict(columns),
        "image_rules": asdict(limits.image_rules),
        "tokenizer": hashlib.sha256((limits.tokenizer_json or "").encode()).hexdigest(),
        "max_seq_length": limits.max_seq_length,
        "heldout_fraction": heldout_fraction,
        "rows_per_shard": rows_per_shard,
        "max_rows": spec.data.max_rows,
        "dedup": spec.data.dedup,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _refuse_mixed_outputs(
    store: Any, out_prefix: str, committed: dict[str, dict], fingerprint: str
) -> None:
    if any(r.get("fingerprint") != fingerprint for r in committed.values()):
        raise PreparedConflictError(
            f"{store.uri_of(out_prefix)} was prepared with different data settings (source, columns, "
            f"image sizes, split or shard size changed); use {elsewhere(out_prefix)}, or delete "
            f"{store.uri_of(out_prefix)} to prepare again"
        )


class PreparedConflictError(RunConflictError, ValueError):
    """Prepared shards under the output prefix came from another source or other data settings."""
