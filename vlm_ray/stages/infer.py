"""The infer stage: predict every input shard with each model tag, exactly once, on a pool of Ray actors.

    run_infer(spec) -> inputs: <run>/prepared/heldout/ (default), or infer.source prepared into
    <run>/bulk/<job>/input/all/ -> per tag ("base", "finetuned", ...): resolve the weights ->
    InferActor pool (one model copy each) -> <predictions>/<tag>/shard-NNNNN.jsonl, commit
    markers under <predictions>/<tag>/_done/, <predictions>/<tag>/manifest.json, where
    <predictions> is <run>/predictions/ for the held-out split (what evaluate scores) and
    <run>/bulk/<job>/predictions/ for infer.source (infer.job, default named after the source).

So a trained run can caption any number of sources, each in its own folder beside its
held-out predictions. With infer.source, the rows prepare quarantined go into their shard's
predictions file as error records (prediction null, error = the reason), so predictions
account for every input row once.

A re-run skips committed shards; a re-run with another model, input or generation settings
on the same predictions is refused rather than mixed (delete the folder, or use another
infer.job or run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Any

from vlm_ray import layout
from vlm_ray.config import JobSpec
from vlm_ray.data.shards import list_shards
from vlm_ray.infer.gpu_sharing import time_slicing_hint
from vlm_ray.infer.loading import ModelRef, resolve_model_ref
from vlm_ray.infer.pool import ShardTask, run_pool
from vlm_ray.infer.throughput import actor_summary, more_copies_hint, shared_window_rate
from vlm_ray.ledger import ShardLedger
from vlm_ray.operator_errors import MissingInputError, RunConflictError, elsewhere
from vlm_ray.ray_cluster import cluster_gpus, init_ray
from vlm_ray.storage import Store, open_store

log = logging.getLogger(__name__)


def infer_source_spec(spec: JobSpec) -> JobSpec:
    """The spec prepare reads infer.source with: its own columns, not the training data's."""
    i = spec.infer
    data = spec.data.model_copy(
        update={
            "image_column": i.image_column or spec.data.image_column,
            "id_column": i.id_column,
            "prompt_column": i.prompt_column,
            "text_column": i.text_column or spec.data.text_column,
        }
    )
    return spec.model_copy(update={"data": data})


def job_name_for(source: str) -> str:
    """A bulk job's default name: the source's last path part and a hash of the whole source.

    s3://bucket/scans/2026-11/ -> 2026-11-<8 hex>. The same source string gives the same name
    (a re-run resumes the job); another source, even one with the same last part, another.
    """
    source = source.strip()
    path = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", source).rstrip("/")
    # A data file's suffix says nothing about the job: batches/2026-11.parquet -> 2026-11-...
    tail = re.sub(r"\.(jsonl|json|parquet|csv|arrow)$", "", path.rsplit("/", 1)[-1])
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-._")[:40]
    digest = hashlib.sha256(source.rstrip("/").encode()).hexdigest()[:8]
    return f"{slug or 'source'}-{digest}"


def bulk_job(spec: JobSpec) -> str | None:
    """The bulk job of infer.source (infer.job, else named after the source); None: the held-out split."""
    if spec.infer.source is None:
        return None
    return spec.infer.job or job_name_for(spec.infer.source)


def input_shards_prefix(spec: JobSpec) -> str:
    """Where the input shards are (or will be): the held-out split, or bulk/<job>/input/all."""
    job = bulk_job(spec)
    if job is None:
        return f"{layout.PREPARED}/heldout"
    return f"{layout.bulk_input(job)}/all"


def input_prefix(spec: JobSpec) -> str:
    """input_shards_prefix, after preparing infer.source into it when the spec sets one."""
    job = bulk_job(spec)
    if job is None:
        return input_shards_prefix(spec)
    from vlm_ray.stages.prepare import prepare_dataset

    log.info("infer: bulk job %r over %s", job, spec.infer.source)
    prepare_dataset(
        infer_source_spec(spec),
        spec.infer.source,
        spec.infer.format,
        layout.bulk_input(job),
        None,
        require_text=False,
        prompt=spec.infer.prompt,
        rows_per_shard=spec.infer.rows_per_shard,
    )
    return input_shards_prefix(spec)


def _shard_id_of(key: str) -> str:
    return key.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def shard_tasks(
    input_keys: list[str],
    tag: str,
    quarantine_keys: list[str] | None = None,
    job: str | None = None,
) -> list[ShardTask]:
    """One task per input shard (prepared rows, quarantined rows or both); the predictions file takes its name."""
    inputs = {_shard_id_of(k): k for k in input_keys}
    # prepare names an input shard's quarantine file as its parquet shard: shard-NNNNN.jsonl
    quarantined = {_shard_id_of(k): k for k in quarantine_keys or []}
    return [
        ShardTask(
            sid,
            inputs.get(sid),
            f"{layout.predictions_dir(tag, job)}/{sid}.jsonl",
            quarantined.get(sid),
        )
        for sid in sorted(inputs.keys() | quarantined.keys())
    ]


def predictions_fingerprint(spec: JobSpec, ref: ModelRef, prefix: str) -> str:
    """What makes predictions comparable: the weights, the input and the generation settings."""
    gen = spec.generation.model_dump(exclude={"batch_size"})  # batch size changes speed, not output
    key = {"model": ref.model_uri, "adapter": ref.adapter_uri, "input": prefix, "generation": gen}
    if spec.infer.fp8 != "off":
        # float8 weights are other weights. Only when set, so bf16 folders keep their fingerprint.
        key["fp8"] = spec.infer.fp8
        if spec.infer.fp8_scaling != "row":
            key["fp8_scaling"] = spec.infer.fp8_scaling
        if spec.infer.fp8_scaling == "static":
            key["fp8_calibration_rows"] = spec.infer.fp8_calibration_rows
    if spec.infer.vision_attention != "auto":
        # Another kernel rounds differently: outputs may differ in a token or two.
        key["vision_attention"] = spec.infer.vision_attention
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class MixedPredictionsError(RunConflictError, RuntimeError):
    """Predictions already in the folder were made with other weights, input or settings."""


def _refuse_mixed(store: Store, ledger: ShardLedger, fingerprint: str) -> None:
    for record in ledger.records():
        if record.get("fingerprint") != fingerprint:
            raise MixedPredictionsError(
                f"{store.uri_of(ledger.prefix)} holds predictions made with another model, input "
                f"or generation settings (shard {record['shard_id']}); delete that folder to "
                f"predict again, or use {elsewhere(ledger.prefix)}"
            )


def _input_dir(prefix: str) -> str | None:
    """The prepared-input folder of infer.source shards (bulk/<job>/input); None for the held-out split."""
    if not prefix.startswith(layout.BULK + "/"):
        return None
    return prefix.rsplit("/", 1)[0]


def _prepared_input(store: Store, prefix: str) -> dict[str, Any] | None:
    """The prepare manifest of infer.source inputs (None for the held-out split)."""
    folder = _input_dir(prefix)
    if folder is None or not store.exists(f"{folder}/manifest.json"):
        return None
    return store.read_json(f"{folder}/manifest.json")


def input_quarantine_keys(store: Store, prefix: str) -> list[str]:
    """For infer.source inputs: the quarantine files of rows prepare rejected (they become error records)."""
    prepared = _prepared_input(store, prefix)
    return list(prepared.get("quarantine", [])) if prepared else []


def _input_quarantine(store: Store, prefix: str) -> dict[str, Any]:
    """For infer.source inputs: rows in, how many prepare rejected, and where their reasons are."""
    prepared = _prepared_input(store, prefix)
    if prepared is None:
        return {}
    return {
        "input_rows": prepared.get("rows_in"),
        "input_quarantined": prepared.get("rows_quarantined", 0),
        "input_quarantine": store.uri_of(f"{_input_dir(prefix)}/quarantine"),
    }


def predict_with(
    spec: JobSpec,
    store: Store,
    ref: ModelRef,
    prefix: str,
    input_keys: list[str],
    quarantine_keys: list[str] | None = None,
) -> dict[str, Any]:
    """Predict every input shard with one model; returns (and writes) <predictions>/<tag>/manifest.json."""
    start = time.time()
    job = bulk_job(spec)
    out_prefix = layout.predictions_dir(ref.tag, job)
    ledger = ShardLedger(store, out_prefix)
    fingerprint = predictions_fingerprint(spec, ref, prefix)
    _refuse_mixed(store, ledger, fingerprint)
    tasks = shard_tasks(input_keys, ref.tag, quarantine_keys, job)
    done = ledger.done_ids()
    todo = [t for t in tasks if t.shard_id not in done]
    log.info(
        "infer[%s]: start %s -> %s; %d input shards, %d already done; weights %s%s",
        ref.tag,
        store.uri_of(prefix),
        store.uri_of(out_prefix),
        len(tasks),
        len(tasks) - len(todo),
        ref.model_uri,
        f" + adapter {ref.adapter_uri}" if ref.adapter_uri else "",
    )
    calibration_input = next((t.input_key for t in tasks if t.input_key), None)
    run_pool(spec, ref.to_dict(), todo, out_prefix, fingerprint, cluster_gpus(), calibration_input)
    wanted = {t.shard_id for t in tasks}
    shards = [r for r in ledger.records() if r["shard_id"] in wanted]
    missing = wanted - {r["shard_id"] for r in shards}
    if missing:
        raise RuntimeError(f"infer[{ref.tag}]: shards {sorted(missing)} have no commit marker")
    wall = time.time() - start
    ran = [r for r in shards if r["shard_id"] in {t.shard_id for t in todo}]
    rows_ran = sum(r["rows"] for r in ran)
    manifest = {
        "tag": ref.tag,
        "job": job,
        "source": spec.infer.source,
        "model": ref.to_dict(),
        "input": store.uri_of(prefix),
        **_input_quarantine(store, prefix),
        "fingerprint": fingerprint,
        "generation": spec.generation.model_dump(),
        "rows": sum(r["rows"] for r in shards),
        "errors": sum(r["errors"] for r in shards),
        "tokens": sum(r["tokens"] for r in shards),
        "shards": [
            {
                k: r.get(k)
                for k in (
                    "shard_id",
                    "input_key",
                    "quarantine_key",
                    "key",
                    "rows",
                    "errors",
                    "sha256",
                )
            }
            for r in shards
        ],
        "shards_run": len(ran),
        "shards_skipped": len(shards) - len(ran),
        "wall_s": round(wall, 2),
        "images_per_s": round(rows_ran / wall, 3) if ran else None,
        # the shards run now, per actor: a slow GPU or a late-starting actor shows here
        "actors": actor_summary(ran),
        # once every actor had finished its first shard: the pool's rate when actors share GPUs
        "images_per_s_all_warm": shared_window_rate(ran),
    }
    store.write_json(f"{out_prefix}/manifest.json", manifest)
    if manifest.get("input_rows") not in (None, manifest["rows"]):
        log.warning(
            "infer[%s]: %d prediction records for %d input rows (the prepared input's rows_in)",
            ref.tag,
            manifest["rows"],
            manifest["input_rows"],
        )
    for actor, a in manifest["actors"].items():
        rate = a["steady_images_per_s"]
        log.info(
            "infer[%s]: actor %s: %d shards, %d rows, %s%s",
            ref.tag,
            actor,
            a["shards"],
            a["rows"],
            f"{rate} images/s after its first shard"
            if rate is not None
            else "no rate after its first shard (it ran one)",
            f", GPU memory peak {a['gpu_peak_gib']} of {a['gpu_total_gib']} GiB"
            if a["gpu_peak_gib"] is not None
            else "",
        )
    for hint in (
        more_copies_hint(manifest["actors"], spec.infer.actors_per_gpu),
        time_slicing_hint(manifest["actors"]),
    ):
        if hint:
            log.info("infer[%s]: %s", ref.tag, hint)
    if len(manifest["actors"]) > 1 and manifest["images_per_s_all_warm"] is not None:
        log.info(
            "infer[%s]: %s images/s once all %d actors were warm",
            ref.tag,
            manifest["images_per_s_all_warm"],
            len(manifest["actors"]),
        )
    log.info(
        "infer[%s]: done in %.1f s: %d rows (%d errors), %d shards run, %d skipped, %s images/s -> %s",
        ref.tag,
        wall,
        manifest["rows"],
        manifest["errors"],
        manifest["shards_run"],
        manifest["shards_skipped"],
        manifest["images_per_s"],
        store.uri_of(f"{out_prefix}/manifest.json"),
    )
    return manifest


def run_infer(
    spec: JobSpec, models: list[str] | None = None, model_runs: dict[str, str] | None = None
) -> dict[str, Any]:
    """Predict the inputs with each model tag (default infer.models); model_runs maps extra tags to run URIs."""
    start = time.time()
    init_ray(spec.ray)
    store = open_store(spec.run.uri, spec.run.s3_endpoint_url)
    tags = list(models or spec.infer.models)
    # Resolve every tag before any work: a missing model fails in seconds, not after the base ran.
    refs = [resolve_model_ref(spec, tag, model_runs) for tag in tags]
    job = bulk_job(spec)
    if job is not None and len(tags) > 1:
        log.info(
            "infer: this bulk job captions every image with each of %s; "
            "infer.models=[finetuned] runs the fine-tuned model alone",
            tags,
        )
    prefix = input_prefix(spec)
    keys = list_shards(store, prefix)
    quarantine_keys = input_quarantine_keys(store, prefix)
    if not keys and not quarantine_keys:
        raise MissingInputError(
            f"infer: no input shards under {store.uri_of(prefix)}; run the prepare stage first "
            "(or set infer.source to a folder or s3:// prefix of images)"
        )
    results = {
        ref.tag: predict_with(spec, store, ref, prefix, keys, quarantine_keys) for ref in refs
    }
    predictions = store.uri_of(layout.predictions_root(job))
    log.info(
        "infer: done in %.1f s: %s -> %s",
        time.time() - start,
        ", ".join(f"{t} {m['rows']} rows" for t, m in results.items()),
        predictions,
    )
    return {"input": store.uri_of(prefix), "predictions": predictions, "models": results}
