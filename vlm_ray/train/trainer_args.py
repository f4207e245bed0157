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
    return {
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
