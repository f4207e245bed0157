"""A run trains one model: refuse to resume or skip with settings other than the ones it was started with.

Prepare and infer refuse to mix outputs made with different settings; training
needs the same guard, or a re-run with a new learning rate would silently resume
old checkpoints (or skip, finding the old model) on the same run URI.
"""

from __future__ import annotations

from typing import Any

from vlm_ray import layout
from vlm_ray.config import JobSpec, SpecError, spec_to_dict
from vlm_ray.storage import Store

# Keys that change how training runs, not what it produces.
_OPERATIONAL = {
    "train.max_restarts",
    "train.logging_steps",
    "train.save_total_limit",
    "train.dataloader_num_workers",
    "train.profile_steps",
    "train.profile_start_step",
    # which activations are recomputed in backward, not what is computed; a resume may switch them
    "train.checkpoint_every_n_layers",
    "train.checkpoint_scope",
    # how the same layers' kernels are launched (replayed CUDA graphs or one by one), not what they compute
    "train.cuda_graphs",
    # where the frozen input embedding's rows are looked up, not what they are
    "train.host_input_embedding",
    # over which positions the output head runs: the loss is the same sum over the same tokens
    "train.label_span_logits",
    # where LoRA's product is summed (into the base output's buffer or a copy of it) and so
    # where it is rounded, not what is computed
    "train.lora_add_without_copy",
    "model.name",  # the same model may be reached by another path or URI; the data digest and knobs decide
}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def training_settings(spec: JobSpec, store: Store) -> dict[str, Any]:
    """What decides the trained model: model/lora/train/save knobs and the prepared train shards' digests."""
    d = spec_to_dict(spec)
    knobs = _flatten({k: d[k] for k in ("model", "lora", "train", "save")})
    knobs = {k: v for k, v in knobs.items() if k not in _OPERATIONAL}
    manifest = (
        store.read_json(layout.PREPARED_MANIFEST) if store.exists(layout.PREPARED_MANIFEST) else {}
    )
    shards = sorted(
        s.get("sha256", s["key"]) for s in manifest.get("shards", []) if s.get("split") == "train"
    )
    return {"knobs": knobs, "train_shards": shards}


def refuse_changed_settings(spec: JobSpec, store: Store) -> None:
    """Raise SpecError naming every key that differs from the run's recorded settings (if any)."""
    if not store.exists(layout.TRAIN_SETTINGS):
        return
    recorded, current = store.read_json(layout.TRAIN_SETTINGS), training_settings(spec, store)
    old, new = recorded.get("knobs", {}), current["knobs"]
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if recorded.get("train_shards") != current["train_shards"]:
        changed.append("the prepared train shards differ (data re-prepared)")
    if changed:
        raise SpecError(
            f"{store.uri} was already trained (or is training) with other settings:\n  "
            + "\n  ".join(changed)
            + f"\nUse a new run.uri, or delete {store.uri_of('checkpoints')}, {store.uri_of('model')}, "
            f"{store.uri_of('train')} to train this run again."
        )


def record_training_settings(spec: JobSpec, store: Store) -> None:
    """Record the settings as training starts; if another start recorded first, they must match."""
    if not store.create_exclusive(layout.TRAIN_SETTINGS, _dumps(training_settings(spec, store))):
        refuse_changed_settings(spec, store)


def _dumps(obj: Any) -> bytes:
    import json

    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
