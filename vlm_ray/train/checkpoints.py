"""Trainer checkpoints in object storage: sync each save to <run>/checkpoints/, keep the newest N, find the latest to resume.

A checkpoint is the Trainer's own folder (weights or adapter, optimizer,
scheduler, RNG states, trainer_state.json with the step, which gives the
data position). It is uploaded file by file (each write atomic) and counts
only once its `_complete.json` marker is written last, so an actor killed in
the middle of an upload never leaves a checkpoint that looks whole.
Engine-agnostic: it works with any transformers.Trainer subclass (TRL's SFTTrainer too).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from transformers import TrainerCallback

from vlm_ray import layout
from vlm_ray.storage import Store

log = logging.getLogger(__name__)

COMPLETE = "_complete.json"
_STEP_DIR = re.compile(rf"^{layout.CHECKPOINTS}/step-(\d+)/")


def checkpoint_prefix(step: int) -> str:
    """checkpoints/step-000120: zero-padded so keys sort by step."""
    return f"{layout.CHECKPOINTS}/step-{step:06d}"


def _steps_in_store(store: Store) -> tuple[set[int], set[int]]:
    """(every step with any file, steps whose checkpoint is complete)."""
    seen, complete = set(), set()
    for key in store.list(layout.CHECKPOINTS):
        m = _STEP_DIR.match(key)
        if m:
            step = int(m.group(1))
            seen.add(step)
            if key.endswith("/" + COMPLETE):
                complete.add(step)
    return seen, complete


def completed_checkpoint_steps(store: Store) -> list[int]:
    """Steps of the complete checkpoints in the store, oldest first."""
    return sorted(_steps_in_store(store)[1])


def upload_checkpoint(store: Store, local_dir: str | Path, step: int, keep: int) -> str:
    """Upload a Trainer checkpoint folder, mark it complete, then drop all but the newest `keep`; returns its URI."""
    t0 = time.time()
    prefix = checkpoint_prefix(step)
    files = store.upload_dir(local_dir, prefix)
    store.write_json(f"{prefix}/{COMPLETE}", {"step": step, "files": files, "time": time.time()})
    pruned = prune_checkpoints(store, keep)
    log.info(
        "checkpoint: step %d -> %s (%d files, %.1fs; pruned %s)",
        step,
        store.uri_of(prefix),
        files,
        time.time() - t0,
        pruned or "none",
    )
    return store.uri_of(prefix)


def prune_checkpoints(store: Store, keep: int) -> list[int]:
    """Delete complete checkpoints beyond the newest `keep`, and partial uploads older than the newest complete one."""
    seen, complete = _steps_in_store(store)
    if not complete:
        return []
    kept = set(sorted(complete)[-keep:])
    newest = max(complete)
    doomed = sorted(s for s in seen if s not in kept and (s in complete or s < newest))
    for step in doomed:
        prefix = checkpoint_prefix(step)
        # The marker goes first: a half-deleted checkpoint must not look complete.
        store.delete(f"{prefix}/{COMPLETE}")
        store.delete_prefix(prefix)
    return doomed


def download_latest_checkpoint(store: Store, dest_root: str | Path) -> str | None:
    """Copy the newest complete checkpoint to dest_root/checkpoint-<step> for resume_from_checkpoint; None if there is none."""
    steps = completed_checkpoint_steps(store)
    if not steps:
        return None
    step = steps[-1]
    local = Path(dest_root) / f"checkpoint-{step}"
    store.download_dir(checkpoint_prefix(step), local)
    log.info("checkpoint: resuming from %s (step %d)", store.uri_of(checkpoint_prefix(step)), step)
    return str(local)


class CheckpointSync(TrainerCallback):
    """After each Trainer save, upload that checkpoint to <run>/checkpoints/ and keep the newest `keep`."""

    def __init__(self, store: Store, keep: int):
        self.store = store
        self.keep = keep
        self.uploaded: list[str] = []

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not local.is_dir():
            raise FileNotFoundError(
                f"the trainer reported a save at step {state.global_step} but {local} does not exist"
            )
        self.uploaded.append(upload_checkpoint(self.store, local, state.global_step, self.keep))
