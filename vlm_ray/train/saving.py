"""Saving a trained model under <run>/model/: the adapter and/or the merged model, for either engine.

No transformers, peft or unsloth import here: the Unsloth engine must import unsloth
before any of them, so this module stays safe to import first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm_ray import layout
from vlm_ray.config import JobSpec
from vlm_ray.models.truncation import forget_truncation
from vlm_ray.storage import Store

# (model with adapter, processor, local folder): writes the merged model and its processor there.
SaveMerged = Callable[[Any, Any, Path], None]


def save_pretrained_and_upload(
    model: Any, processor: Any, local_dir: Path, store: Store, key: str
) -> str:
    """model.save_pretrained + processor.save_pretrained into local_dir, uploaded to key; its URI."""
    model.save_pretrained(local_dir)
    processor.save_pretrained(local_dir)
    store.upload_dir(local_dir, key)
    return store.uri_of(key)


def save_trained_model(
    spec: JobSpec,
    store: Store,
    workdir: Path,
    model: Any,
    processor: Any,
    save_merged: SaveMerged,
) -> dict[str, str]:
    """Adapter (save_pretrained + processor) and/or merged model (save_merged), uploaded under <run>/model/."""
    forget_truncation(processor)
    if spec.model.full_finetuning:
        # Full fine-tuning has no adapter: the trained weights are the model.
        uri = save_pretrained_and_upload(model, processor, workdir / "merged", store, layout.MERGED)
        return {"kind": "full", "merged_uri": uri}
    out: dict[str, str] = {}
    if spec.save.adapter:
        uri = save_pretrained_and_upload(
            model, processor, workdir / "adapter", store, layout.ADAPTER
        )
        out.update(kind="adapter", adapter_uri=uri)
    if spec.save.merged_16bit:
        if spec.train.fp8:
            # The adapter merges into the bf16 weights kept on the host, not the float8 ones.
            from vlm_ray.models.fp8_frozen_linear import restore_bf16_base_layers

            restore_bf16_base_layers(model)
        merged_dir = workdir / "merged"
        save_merged(model, processor, merged_dir)
        store.upload_dir(merged_dir, layout.MERGED)
        out["merged_uri"] = store.uri_of(layout.MERGED)
        out.setdefault("kind", "full")
    return out
