"""The train stage on a real local Ray cluster with a real S3 server: one actor trains, writes the model,
metrics, loss plot and summary; when its process is killed mid-run, Ray restarts it and it resumes from
the last checkpoint in object storage, ending at the same step count."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import ray

from vlm_ray import layout
from vlm_ray.config import JobSpec, parse_spec
from vlm_ray.storage import S3Store, Store
from vlm_ray.train.checkpoints import completed_checkpoint_steps
from vlm_ray.train.metrics_log import read_metrics


def kill_mid_run_and_finish(spec: JobSpec, store: Store) -> tuple[dict, int]:
    """Run the train stage, SIGKILL its actor once a checkpoint is in storage, wait for the end.

    Returns the stage's summary and the newest checkpoint step at the kill. Also the GPU test's
    body (tests/test_unsloth_gpu.py), with the Unsloth engine.
    """
    from vlm_ray.stages.train import run_train, train_actor_name

    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=run_train(spec)), daemon=True)
    runner.start()
    deadline = time.time() + 240
    while not completed_checkpoint_steps(store):
        assert runner.is_alive(), f"training ended before any checkpoint: {outcome}"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    pid = ray.get(ray.get_actor(train_actor_name(spec)).pid.remote())
    killed_after = max(completed_checkpoint_steps(store))
    os.kill(pid, signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive() and "summary" in outcome
    summary = outcome["summary"]
    max_steps = spec.train.max_steps
    assert killed_after < max_steps, "the actor was killed before the run ended"
    assert summary["actor_restarted"] is True
    assert summary["resumed_from"] is not None
    assert summary["steps"] == max_steps
    # every step logged exactly once, although some were run twice
    assert [r["step"] for r in read_metrics(store) if "loss" in r] == list(range(1, max_steps + 1))
    keep = spec.train.save_total_limit
    saved = list(range(spec.train.save_steps, max_steps + 1, spec.train.save_steps))[-keep:]
    assert completed_checkpoint_steps(store) == saved  # save_total_limit in object storage
    return summary, killed_after


def test_killed_train_actor_resumes_from_the_last_checkpoint_and_finishes_the_run(
    ray_cluster, s3_endpoint, s3_bucket, tiny_qwen2_vl, write_prepared
):
    from vlm_ray.stages.train import run_train

    run_uri = f"s3://{s3_bucket}/runs/{uuid.uuid4().hex[:8]}"
    store = S3Store(run_uri, endpoint_url=s3_endpoint)
    write_prepared(store, rows=32, rows_per_shard=16)
    spec = parse_spec(
        {
            "run": {"uri": run_uri, "s3_endpoint_url": s3_endpoint},
            "model": {"name": str(tiny_qwen2_vl), "max_seq_length": 256},
            "data": {"source": "unused", "image_min_size": 56, "image_max_size": 84},
            "train": {
                "engine": "auto",
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 8,  # steps long enough to kill the actor mid-run
                "max_steps": 8,
                "save_steps": 2,
                "save_total_limit": 2,
                "logging_steps": 1,
                "warmup_steps": 0,
                "max_restarts": 2,
            },
        }
    )
    summary, _ = kill_mid_run_and_finish(spec, store)
    assert summary["engine"] == "hf" and "no CUDA GPU" in summary["reason"]
    assert completed_checkpoint_steps(store) == [6, 8]

    info = store.read_json(layout.MODEL_INFO)
    assert info == {
        "base_model": str(tiny_qwen2_vl),
        "kind": "adapter",
        "path": layout.ADAPTER,
        "engine": "hf",
        "family": "qwen2_vl",
        "merged_path": None,
    }
    assert store.exists(f"{layout.ADAPTER}/adapter_model.safetensors")
    assert store.read_bytes(layout.LOSS_PLOT)[:8] == b"\x89PNG\r\n\x1a\n"
    saved = store.read_json(layout.TRAIN_SUMMARY)
    assert saved["steps"] == 8 and saved["spec"]["train"]["max_steps"] == 8
    assert saved["final_loss"] > 0 and saved["wall_time_s"] > 0

    # a re-run finds the summary and does not train again
    again = run_train(spec)
    assert again == saved
