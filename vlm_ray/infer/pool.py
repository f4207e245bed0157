"""A pool of Ray actors, each holding one model copy, predicting input shards exactly once.

Ray Core actors rather than Ray Data's map_batches: the unit of work and of recovery here is one
input shard, whose predictions file is written atomically and committed with a create-only marker
(vlm_ray.ledger). An actor task per shard maps onto that one to one: a re-run skips committed
shards before any work is scheduled, and when an actor's process dies, Ray restarts the actor
(max_restarts, reloading the model) and re-runs its unfinished shard calls on it
(max_task_retries); the marker makes a redone shard count once. Ray Data would stream rows
through the actors without that per-shard commit point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from vlm_ray.config import JobSpec, parse_spec, spec_to_dict
from vlm_ray.durations import rough_duration
from vlm_ray.infer.gpu_sharing import gpu_sharing_mode
from vlm_ray.ledger import ShardLedger
from vlm_ray.operator_errors import ClusterMismatchError
from vlm_ray.ray_cluster import actor_was_restarted
from vlm_ray.storage import open_store

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2  # one shard generating, the next one queued behind it
PROGRESS_EVERY_S = 15.0
QUIET_LINE_EVERY_S = 60.0  # while no shard finishes (loading, compiling), a line this often


@dataclass(frozen=True)
class ShardTask:
    """One input shard and where its predictions go."""

    shard_id: str  # "shard-00003": the ledger's key
    # prepared/heldout/shard-00003.parquet; None when prepare rejected every row of the shard
    input_key: str | None
    # predictions/<tag>/shard-00003.jsonl (bulk/<job>/predictions/<tag>/... for a bulk job)
    output_key: str
    # bulk/<job>/input/quarantine/shard-00003.jsonl: rows prepare rejected, written as error records
    quarantine_key: str | None = None


@ray.remote
class InferActor:
    """Loads one model copy once, then predicts whole shards: write the file, then commit it.

    A threaded actor (run_pool gives it max_concurrency=IN_FLIGHT_PER_ACTOR): while one shard
    generates, the next one is read, decoded and preprocessed; a lock keeps their generate calls
    apart, so the device always has the next batch ready and runs one batch at a time.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        ref: dict[str, Any],
        ledger_prefix: str,
        fingerprint: str,
        calibration_input_key: str | None = None,
    ):
        from vlm_ray.infer.fp8_calibration import SCALES_FILE, Fp8Calibration
        from vlm_ray.infer.loading import ModelRef, load_for_inference

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        self.spec: JobSpec = parse_spec(spec, "(infer actor)")
        import torch

        if not torch.cuda.is_available():
            # Use the CPUs Ray reserved for this actor, no more.
            torch.set_num_threads(max(1, int(self.spec.ray.num_cpus_per_worker)))
        self.store = open_store(self.spec.run.uri, self.spec.run.s3_endpoint_url)
        self.ledger = ShardLedger(self.store, ledger_prefix)
        self.fingerprint = fingerprint
        self.gpu_lock = threading.Lock()
        start = time.time()
        # Used by infer.fp8_scaling: static only: the folder's scales, or the rows to make them.
        calibration = Fp8Calibration(
            self.store,
            f"{ledger_prefix}/{SCALES_FILE}",
            calibration_input_key,
            self.spec.infer.fp8_calibration_rows,
            fingerprint,
        )
        self.model, self.processor, self.note = load_for_inference(
            self.spec, ModelRef(**ref), calibration
        )
        self.restarted = actor_was_restarted()
        # After the model load: the CUDA context, and with it any MPS connection, exists now.
        self.gpu_sharing = gpu_sharing_mode(
            ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0),
            torch.cuda.is_available(),
        )
        log.info(
            "infer actor pid %d: loaded %s in %.1f s%s",
            os.getpid(),
            self.note,
            time.time() - start,
            " (restarted after a failure)" if self.restarted else "",
        )

    def engine_note(self) -> str:
        """Which engine and weights this actor runs."""
        return self.note

    def predict_shard(self, task: ShardTask) -> dict[str, Any]:
        """Predict one input shard into its predictions file and commit it; a committed shard is skipped."""
        from vlm_ray.data.shards import read_shard
        from vlm_ray.infer.generation import predict_table
        from vlm_ray.infer.quarantined import fixed_prompt, quarantined_records

        if self.ledger.is_done(task.shard_id):  # committed by an earlier attempt
            return self.ledger.store.read_json(f"{self.ledger.prefix}/_done/{task.shard_id}.json")
        start = time.time()
        records = []
        if task.input_key is not None:
            table = read_shard(self.store, task.input_key)
            records = predict_table(
                self.model, self.processor, table, self.spec.generation, self.gpu_lock
            )
        if task.quarantine_key is not None:
            prompt = fixed_prompt(self.spec)
            records += quarantined_records(self.store, task.quarantine_key, prompt)
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        # The file first, the marker second: a shard is done only once both exist.
        self.store.write_bytes(task.output_key, body)
        seconds = time.time() - start
        record = {
            "input_key": task.input_key,
            "quarantine_key": task.quarantine_key,
            "key": task.output_key,
            "rows": len(records),
            "errors": sum(1 for r in records if r["error"]),
            "tokens": sum(r["tokens"] for r in records),
            "sha256": hashlib.sha256(body).hexdigest(),
            "seconds": round(seconds, 3),
            "images_per_s": round(len(records) / seconds, 3) if seconds else None,
            "fingerprint": self.fingerprint,
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "actor_restarted": self.restarted,
            # what sizing infer.actors_per_gpu and generation.batch_size needs to know
            **gpu_memory_gib(),
            "gpu_sharing": self.gpu_sharing,
        }
        if not self.ledger.commit(task.shard_id, record):  # another attempt committed first
            return self.ledger.store.read_json(f"{self.ledger.prefix}/_done/{task.shard_id}.json")
        return record


def gpu_memory_gib() -> dict[str, float | None]:
    """gpu_peak_gib: the most GPU memory this process's allocator has held so far (reserved, as
    the GPU sees it, not only what tensors use); gpu_total_gib: its GPU's memory. None without
    CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {"gpu_peak_gib": None, "gpu_total_gib": None}
    return {
        "gpu_peak_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "gpu_total_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2),
    }


def actor_gpus(spec: JobSpec, gpus: int) -> float:
    """The GPU share of one inference actor: none without GPUs, else the spec's
    infer_actor_gpu_share as Ray can hold it."""
    if not gpus:
        return 0.0
    # Ray keeps resource amounts to 4 decimals; rounding down keeps n shares within the whole
    return math.floor(spec.infer_actor_gpu_share * 1e4) / 1e4


def default_pool_size(spec: JobSpec, gpus: int) -> int:
    """spec.ray.pool_size, else as many actors as the cluster's GPUs hold, else 1 (CPU)."""
    if spec.ray.pool_size:
        return spec.ray.pool_size
    share = actor_gpus(spec, gpus)
    if share:
        # + 1e-6: a float quotient just under a whole number (3 / 0.3 = 9.999...) is that number
        return max(1, int(gpus / share + 1e-6))
    return 1


def run_pool(
    spec: JobSpec,
    ref: dict[str, Any],
    tasks: list[ShardTask],
    ledger_prefix: str,
    fingerprint: str,
    gpus: int,
    calibration_input_key: str | None = None,
) -> list[dict[str, Any]]:
    """Predict every task on a pool of InferActors with bounded in-flight work; returns the commit records.

    calibration_input_key: the input shard whose first rows calibrate infer.fp8_scaling: static
    (the first of the whole input, not of what is left to do, so a resumed run picks the same).
    """
    if not tasks:
        return []
    size = min(default_pool_size(spec, gpus), len(tasks))
    _check_fits(spec, gpus)
    restarts = spec.ray.max_retries
    share = actor_gpus(spec, gpus)
    actor_cls = InferActor.options(
        num_cpus=spec.ray.num_cpus_per_worker,
        num_gpus=share,
        max_restarts=restarts,
        # a shard call in flight (or queued) when the actor died runs again on the restarted actor
        max_task_retries=restarts,
        # the shard queued behind the one generating is prepared meanwhile (see InferActor)
        max_concurrency=IN_FLIGHT_PER_ACTOR,
    )
    spec_dict = spec_to_dict(spec)
    actors = [
        actor_cls.remote(spec_dict, ref, ledger_prefix, fingerprint, calibration_input_key)
        for _ in range(size)
    ]
    log.info(
        "infer[%s]: %d shards on %d actors (num_gpus=%s each, max_restarts=%d)",
        ref["tag"],
        len(tasks),
        size,
        share,
        restarts,
    )
    progress = _Progress(ref["tag"], len(tasks), compiling=compile_note(spec))
    todo = list(reversed(tasks))
    in_flight: dict[Any, tuple[int, ShardTask]] = {}
    load = [0] * size
    records = []
    try:
        while todo or in_flight:
            while todo and min(load) < IN_FLIGHT_PER_ACTOR:
                a = load.index(min(load))
                task = todo.pop()
                in_flight[actors[a].predict_shard.remote(task)] = (a, task)
                load[a] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=PROGRESS_EVERY_S)
            if not ready:
                progress.waiting(len(in_flight))
            for ref_ in ready:
                a, task = in_flight.pop(ref_)
                load[a] -= 1
                try:
                    record = ray.get(ref_)
                except ray.exceptions.RayTaskError as err:  # predict_shard raised
                    raise RuntimeError(
                        f"infer[{ref['tag']}]: input shard {task.input_key} failed: {err}"
                    ) from err
                except ray.exceptions.RayError as err:  # the actor died once too often
                    raise RuntimeError(
                        f"infer[{ref['tag']}]: input shard {task.input_key} failed after "
                        f"{restarts} actor restarts: {err}"
                    ) from err
                records.append(record)
                progress.add(record)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return records


class UnhostableActorError(ClusterMismatchError, ValueError):
    """No node of this cluster can run an inference actor as the spec asks."""


def _check_fits(spec: JobSpec, gpus: int) -> None:
    """Fail now, naming the field, when no node could ever host one actor (Ray would wait forever),
    or when the actors could only fail (float8 on a cluster without GPUs: each restart would
    load the model again before failing)."""
    if spec.infer.fp8 != "off" and not gpus:
        raise UnhostableActorError(
            f"infer.fp8={spec.infer.fp8!r} needs GPUs of compute capability 8.9 or newer, and this "
            "Ray cluster has no GPUs; set infer.fp8: off or submit to a GPU cluster"
        )
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus, want_gpus = spec.ray.num_cpus_per_worker, actor_gpus(spec, gpus)
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= want_gpus for n in nodes):
        biggest = max((n.get("CPU", 0) for n in nodes), default=0)
        raise UnhostableActorError(
            f"ray.num_cpus_per_worker={cpus} (with num_gpus={want_gpus}) fits on no node of this "
            f"cluster (largest node: {biggest} CPUs); lower it or add bigger nodes"
        )


def compile_note(spec: JobSpec) -> str:
    """What each actor compiles on its first batch, by the spec's opt-in speed settings ('' if nothing)."""
    parts = []
    if spec.generation.cache_implementation == "static":
        parts.append("the static-cache decoding step")
    if spec.infer.compile_vision:
        parts.append("the vision blocks")
    if spec.infer.compile_language:
        parts.append("the language MLPs and norms")
    if spec.infer.fp8 != "off":
        parts.append(f"float8 layers (infer.fp8={spec.infer.fp8})")
        if spec.infer.fp8_scaling == "static":
            parts[-1] += " after calibrating their scales"
    return ", ".join(parts)


class _Progress:
    """A log line every PROGRESS_EVERY_S: shards and images done, images/s overall and since the
    last line (the steady rate, once the actors have loaded and compiled), and the time left at
    the recent rate. While nothing finishes, a line every QUIET_LINE_EVERY_S says so, and what
    the first batches are compiling: minutes of silence would look like a hang."""

    def __init__(
        self, tag: str, total: int, clock: Callable[[], float] = time.time, compiling: str = ""
    ):
        self.tag, self.total, self.clock, self.compiling = tag, total, clock, compiling
        self.start = self.last = self.last_done = self.last_quiet = clock()
        self.shards = self.rows = self.errors = self.rows_at_last = 0

    def waiting(self, in_flight: int) -> str | None:
        """Nothing finished in the last wait; returns the line when one is logged."""
        now = self.clock()
        if now - max(self.last_done, self.last_quiet) < QUIET_LINE_EVERY_S:
            return None
        line = (
            f"infer[{self.tag}]: {self.shards}/{self.total} shards done, {in_flight} in flight, "
            f"none finished in the last {rough_duration(now - self.last_done)}"
        )
        if self.shards == 0 and self.compiling:
            line += f"; each actor's first batch compiles {self.compiling}: minutes, not a hang"
        self.last_quiet = now
        log.info(line)
        return line

    def add(self, record: dict[str, Any]) -> str | None:
        """Count one finished shard; returns the line when one is logged."""
        self.shards += 1
        self.rows += record["rows"]
        self.errors += record["errors"]
        now = self.last_done = self.clock()
        if now - self.last < PROGRESS_EVERY_S and self.shards < self.total:
            return None
        recent = (self.rows - self.rows_at_last) / max(now - self.last, 1e-9)
        line = (
            f"infer[{self.tag}]: {self.shards}/{self.total} shards, {self.rows} images "
            f"({self.errors} errors), {self.rows / max(now - self.start, 1e-9):.2f} images/s"
        )
        if self.shards < self.total:
            left = (self.total - self.shards) * self.rows / self.shards
            line += f" ({recent:.2f} recently), {rough_duration(left / max(recent, 1e-9))} left"
        self.last, self.rows_at_last = now, self.rows
        log.info(line)
        return line
