"""The train stage: one Ray actor fine-tunes the model on the prepared train split.

    run_train(spec) -> one TrainActor (GPU when the cluster has one) -> choose_engine ->
    train_unsloth | train_hf, with checkpoints synced to <run>/checkpoints/ ->
    <run>/model/{adapter,merged}/, model_info.json, train/{metrics.jsonl,loss.png,summary.json}

If the actor's process dies, Ray restarts it (train.max_restarts) and retries
the call on the new one (max_task_retries), which resumes from the newest
complete checkpoint in object storage. `train/summary.json` is written last: a
re-run finds it and skips the stage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from vlm_ray import layout
from vlm_ray.config import JobSpec, spec_to_dict
from vlm_ray.models.families import family_of
from vlm_ray.models.resolve import resolve_model_path
from vlm_ray.ray_cluster import actor_was_restarted, cluster_gpus, init_ray
from vlm_ray.storage import Store, open_store
from vlm_ray.train.engine import EngineUnavailableError
from vlm_ray.train.settings_guard import record_training_settings, refuse_changed_settings

log = logging.getLogger(__name__)


def train_actor_name(spec: JobSpec) -> str:
    """The actor's Ray name: one trainer per run URI (a second run_train on the same run fails fast)."""
    return "vlm-ray-train-" + hashlib.sha256(spec.run.uri.encode()).hexdigest()[:12]


def _node_workdir(spec: JobSpec) -> Path:
    """Local scratch for this run on this node (shard cache, trainer output)."""
    root = Path(os.environ.get("VLM_RAY_CACHE", Path(tempfile.gettempdir()) / "vlm-ray"))
    return root / "train" / hashlib.sha256(spec.run.uri.encode()).hexdigest()[:16]


def train_in_this_process(spec: JobSpec, store: Store) -> dict[str, Any]:
    """Resume from the newest checkpoint (if any), train with the chosen engine, write model_info.json."""
    from vlm_ray.train.activation_checkpointing import CheckpointingReport
    from vlm_ray.train.checkpoints import CheckpointSync, download_latest_checkpoint
    from vlm_ray.train.engine import choose_engine, unsloth_only_settings_changed
    from vlm_ray.train.metrics_log import MetricsLog

    engine, reason = choose_engine(spec)
    log.info("train: engine %s (%s)", engine, reason)
    ignored = unsloth_only_settings_changed(spec) if engine != "unsloth" else []
    if ignored:
        log.warning(
            "train: %s only apply to the Unsloth engine; this %s run trains without them",
            ", ".join(ignored),
            engine,
        )
    # A fresh folder per attempt: a killed attempt's half-written local checkpoints are not reused.
    workdir = _node_workdir(spec) / f"attempt-{os.getpid()}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        resume_from = download_latest_checkpoint(store, workdir / "resume")
        # MetricsLog first: its flush at each save lands before the checkpoint is marked complete.
        checkpointing = CheckpointingReport(spec.train.checkpoint_scope)
        callbacks = [
            MetricsLog(store),
            CheckpointSync(store, keep=spec.train.save_total_limit),
            checkpointing,
        ]
        if spec.train.profile_steps:
            from vlm_ray.train.step_profiler import StepProfiler

            t = spec.train
            callbacks.append(StepProfiler(store, t.profile_start_step, t.profile_steps))
        if engine == "unsloth":
            from vlm_ray.train.unsloth_engine import train_unsloth

            result = train_unsloth(spec, store, workdir, resume_from, callbacks)
        else:
            from vlm_ray.train.hf_engine import train_hf

            result = train_hf(spec, store, workdir, resume_from, callbacks)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result.update(engine=engine, engine_reason=reason, **checkpointing.summary())
    kind = result.get("kind", "adapter")
    store.write_json(
        layout.MODEL_INFO,
        {
            "base_model": spec.model.name,
            "kind": kind,
            "path": layout.ADAPTER if kind == "adapter" else layout.MERGED,
            "engine": engine,
            "family": result.get("family")
            or family_of(resolve_model_path(spec.model.name, spec.run.s3_endpoint_url)).name,
            "merged_path": layout.MERGED if result.get("merged_uri") else None,
        },
    )
    return result


@ray.remote
class TrainActor:
    """Holds one training run; Ray restarts it (and retries `train`) if its process dies."""

    def __init__(self, spec: dict[str, Any]):
        from vlm_ray.config import parse_spec

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        self.spec = parse_spec(spec, "(train actor)")
        import torch

        # Use the CPUs Ray reserved for this actor, no more (Ray's default here is 1 thread).
        torch.set_num_threads(max(1, int(self.spec.ray.num_cpus_per_worker)))
        self.restarted = actor_was_restarted()

    def pid(self) -> int:
        """This actor's process id (for operators and the fault-injection test)."""
        return os.getpid()

    def train(self) -> dict[str, Any]:
        """Train to the end (resuming if a checkpoint exists); returns the engine's summary."""
        store = open_store(self.spec.run.uri, self.spec.run.s3_endpoint_url)
        result = train_in_this_process(self.spec, store)
        result["actor_restarted"] = self.restarted
        return result


def _summary(spec: JobSpec, store: Store, result: dict[str, Any], wall_s: float) -> dict[str, Any]:
    from vlm_ray.train.metrics_log import read_metrics

    records = read_metrics(store)
    losses = [r for r in records if "loss" in r]
    rates = [r["samples_per_second"] for r in losses[1:] if "samples_per_second" in r]
    return {
        "engine": result["engine"],
        "reason": result["engine_reason"],
        "steps": result["global_step"],
        "global_step": result["global_step"],
        "epochs": result.get("epoch"),
        "final_loss": losses[-1]["loss"] if losses else None,
        "train_loss": result.get("train_loss"),
        # the first logging window includes start-up; the median of the rest is the steady rate
        "samples_per_second": sorted(rates)[len(rates) // 2] if rates else None,
        "wall_time_s": round(wall_s, 1),
        "resumed_from": result.get("resumed_from"),
        "actor_restarted": result.get("actor_restarted", False),
        "rows": result.get("rows"),
        "kind": result.get("kind"),
        "model_uri": store.uri_of("model"),
        "metrics_uri": store.uri_of(layout.TRAIN_METRICS),
        "engine_summary": result,
        "spec": spec_to_dict(spec),
    }


def run_train(spec: JobSpec) -> dict[str, Any]:
    """Fine-tune in one Ray actor; write the model, metrics, loss plot and summary under the run URI."""
    t0 = time.time()
    init_ray(spec.ray)
    store = open_store(spec.run.uri, spec.run.s3_endpoint_url)
    # Before skipping or resuming: the checkpoints and model here must come from these settings.
    refuse_changed_settings(spec, store)
    if store.exists(layout.TRAIN_SUMMARY) and store.exists(layout.MODEL_INFO):
        log.info(
            "train: %s exists, skipping (delete it to retrain)", store.uri_of(layout.TRAIN_SUMMARY)
        )
        return store.read_json(layout.TRAIN_SUMMARY)
    gpus = cluster_gpus()
    if spec.train.engine == "unsloth" and gpus == 0:
        raise EngineUnavailableError(
            "train.engine=unsloth needs a CUDA GPU, and this Ray cluster has none; "
            "add a GPU worker group or set train.engine=auto / hf"
        )
    num_gpus = spec.ray.num_gpus_per_worker if gpus else 0
    log.info(
        "train: start run=%s model=%s engine=%s actor(num_cpus=%s, num_gpus=%s, max_restarts=%d)",
        store.uri,
        spec.model.name,
        spec.train.engine,
        spec.ray.num_cpus_per_worker,
        num_gpus,
        spec.train.max_restarts,
    )
    record_training_settings(spec, store)
    actor = TrainActor.options(
        name=train_actor_name(spec),
        num_cpus=spec.ray.num_cpus_per_worker,
        num_gpus=num_gpus,
        max_restarts=spec.train.max_restarts,
        # a call in flight when the actor died is retried on the restarted actor
        max_task_retries=spec.train.max_restarts,
        # `pid` answers while `train` runs
        max_concurrency=2,
    ).remote(spec_to_dict(spec))
    try:
        result = ray.get(actor.train.remote())
    finally:
        ray.kill(actor, no_restart=True)

    from vlm_ray.train.loss_plot import plot_loss
    from vlm_ray.train.metrics_log import read_metrics

    records = read_metrics(store)
    if any("loss" in r for r in records):
        store.write_bytes(layout.LOSS_PLOT, plot_loss(records, f"training loss: {store.uri}"))
    summary = _summary(spec, store, result, time.time() - t0)
    store.write_json(layout.TRAIN_SUMMARY, summary)
    log.info(
        "train: done engine=%s steps=%s final_loss=%s samples/s=%s %.1fs%s -> %s",
        summary["engine"],
        summary["steps"],
        _loss_text(summary),
        f"{summary['samples_per_second']:.1f}" if summary["samples_per_second"] else None,
        summary["wall_time_s"],
        f" (resumed from {summary['resumed_from']})" if summary["resumed_from"] else "",
        store.uri_of("model"),
    )
    return summary


def _loss_text(summary: dict[str, Any]) -> str | None:
    """The last logged loss; with no step logged (train.logging_steps above the steps run), the
    run's mean loss, said as such."""
    if summary["final_loss"] is not None:
        return f"{summary['final_loss']:.4f}"
    if summary.get("train_loss") is not None:
        return f"{summary['train_loss']:.4f} (the run's mean: no step was logged)"
    return None
