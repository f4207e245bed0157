"""The one place the training engine is chosen: from train.engine and the hardware."""

from __future__ import annotations

from typing import Literal

from vlm_ray.config import JobSpec, TrainSpec
from vlm_ray.operator_errors import ClusterMismatchError

# train.* settings that only the Unsloth engine reads (the transformers+PEFT engine trains without them).
UNSLOTH_ONLY_SETTINGS = (
    "fused_lora_mlp",
    "recompute_mlp",
    "compile_vision",
    "cuda_graphs",
    "loss_chunks",
)


class EngineUnavailableError(ClusterMismatchError, RuntimeError):
    """The spec asks for an engine this machine cannot run."""


def _unsloth_importable() -> tuple[bool, str]:
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        return False, "unsloth is not installed (pip install '.[gpu]')"
    return True, ""


def choose_engine(spec: JobSpec, stage: Literal["train", "infer"] = "train") -> tuple[str, str]:
    """("unsloth" | "hf", why): Unsloth on a CUDA GPU when importable (engine=auto), else transformers+PEFT.

    The setting that decides is train.engine, or for stage "infer" infer.engine when it is set;
    messages name that setting.
    """
    import torch

    wanted, field = spec.train.engine, "train.engine"
    if stage == "infer" and spec.infer.engine:
        wanted, field = spec.infer.engine, "infer.engine"
    has_gpu = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if has_gpu else None
    if wanted == "hf":
        return "hf", f"{field}=hf" + (f" (on {gpu})" if gpu else " (CPU)")
    if wanted == "unsloth":
        if not has_gpu:
            raise EngineUnavailableError(
                f"{field}=unsloth needs a CUDA GPU, and this worker has none; "
                f"run on a GPU node (ray.num_gpus_per_worker) or set {field}=auto / hf"
            )
        ok, why = _unsloth_importable()
        if not ok:
            raise EngineUnavailableError(f"{field}=unsloth, but {why}")
        return "unsloth", f"{field}=unsloth on {gpu}"
    if not has_gpu:
        return "hf", f"{field}=auto and no CUDA GPU: transformers+PEFT on CPU"
    ok, why = _unsloth_importable()
    if not ok:
        return "hf", f"{field}=auto on {gpu}, but {why}: transformers+PEFT"
    return "unsloth", f"{field}=auto and a CUDA GPU ({gpu}) with unsloth installed"


def unsloth_only_settings_changed(spec: JobSpec) -> list[str]:
    """The Unsloth-only train settings this spec moves off their defaults, as dotted keys.

    Compared with the defaults, not with what the spec file set: Ray actors receive the whole
    spec as data, where every field looks set.
    """
    return [
        f"train.{name}"
        for name in UNSLOTH_ONLY_SETTINGS
        if getattr(spec.train, name) != TrainSpec.model_fields[name].default
    ]
