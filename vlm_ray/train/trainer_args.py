"""The trainer knobs both engines pass on: TrainingArguments (CPU engine) and TRL SFTConfig (Unsloth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_ray.config import JobSpec


def common_trainer_kwargs(
    spec: JobSpec, output_dir: Path, bf16: bool, fp16: bool
) -> dict[str, Any]:
    """spec.train under TrainingArguments' names; SFTConfig subclasses TrainingArguments, so both take them."""
    t = spec.train
    if t.tf32:
        import torch

        if not torch.cuda.is_available():
            # Said here, naming our field: TrainingArguments would fail later with "--tf32 ...".
            raise ValueError(
                "train.tf32: true needs an Ampere or newer CUDA GPU, and this worker has none; "
                "leave train.tf32 unset on CPU"
            )
    knobs = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps if t.max_steps is not None else -1,
        # transformers 5 folds warmup_ratio into warmup_steps (a float < 1 is a ratio)
        "warmup_steps": t.warmup_ratio if t.warmup_ratio is not None else t.warmup_steps,
        "optim": t.optim,
        "weight_decay": t.weight_decay,
        "lr_scheduler_type": t.lr_scheduler_type,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "data_seed": t.seed,  # the sampler's order depends on (seed, epoch) only: resumable
        "bf16": bf16,
        "fp16": fp16,
        "logging_steps": t.logging_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "dataloader_num_workers": t.dataloader_num_workers,
        "remove_unused_columns": False,  # the collator needs messages + images
        "report_to": "none",
    }
    if t.tf32 is not None:
        knobs["tf32"] = t.tf32
    return knobs
