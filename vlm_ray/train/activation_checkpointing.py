"""Activation checkpointing: what the Trainer is told, and what the model ended up with.

Two libraries decide it. Unsloth sets its own checkpointing up at load time
(model.use_gradient_checkpointing), and the Trainer turns transformers' on again in train()
when its `gradient_checkpointing` argument is true, which TRL's SFTConfig defaults to. So
`use_gradient_checkpointing: false` has to reach the Trainer as well, or the layers are
checkpointed anyway. What the model ended up with is read off its layers when training begins
and logged, since neither library says.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from vlm_ray.config import JobSpec

log = logging.getLogger(__name__)


def trainer_checkpointing_kwargs(
    spec: JobSpec, checkpoint_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """TrainingArguments' gradient_checkpointing(+_kwargs) from the spec, for either engine.

    checkpoint_kwargs go to torch's checkpoint (the CPU engine passes use_reentrant=False; the
    Unsloth engine leaves them to TRL and Unsloth, as the notebooks do).
    """
    on = spec.model.use_gradient_checkpointing is not False
    kwargs = dict(checkpoint_kwargs or {})
    if spec.train.checkpoint_every_n_layers > 1:
        kwargs["every_n_layers"] = spec.train.checkpoint_every_n_layers
    return {
        "gradient_checkpointing": on,
        "gradient_checkpointing_kwargs": (kwargs or None) if on else None,
    }


def _layers(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of the model's repeated blocks (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]


def limit_checkpointing(model: Any, scope: str) -> None:
    """Turn checkpointing off for the layers outside `scope` ("vision" or "language"; "all": none).

    The vision tower is where the family table says (Family.in_vision_tower), as for the LoRA
    switches.
    """
    if scope == "all":
        return
    from vlm_ray.models.families import family_by_name
    from vlm_ray.models.submodules import unwrapped

    family = family_by_name(unwrapped(model).config.model_type)
    for name, layer in _layers(model):
        if family.in_vision_tower(name) != (scope == "vision"):
            layer.gradient_checkpointing = False


def checkpointed_layers(model: Any) -> tuple[int, int]:
    """(checkpointed, all) over the model's repeated blocks (transformers' GradientCheckpointingLayer)."""
    layers = _layers(model)
    return sum(bool(m.gradient_checkpointing) for _, m in layers), len(layers)


class CheckpointingReport(TrainerCallback):
    """When training begins (after the Trainer turned checkpointing on): apply train.checkpoint_scope,
    then log how many layers are checkpointed and keep it for the run summary."""

    def __init__(self, scope: str = "all") -> None:
        self.scope = scope
        self.layers: tuple[int, int] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        if self.scope != "all" and checkpointed_layers(model)[0] == 0:
            log.warning(
                "train.checkpoint_scope: %s has no effect: no layer is checkpointed "
                "(model.use_gradient_checkpointing is false)",
                self.scope,
            )
        limit_checkpointing(model, self.scope)
        self.layers = checkpointed_layers(model)
        done, total = self.layers
        log.info(
            "train: activation checkpointing on %d of %d layers (scope %s; "
            "model.use_gradient_checkpointing=%s, Trainer gradient_checkpointing=%s)",
            done,
            total,
            self.scope,
            getattr(model, "_unsloth_gradient_checkpointing", "n/a"),
            args.gradient_checkpointing,
        )

    def summary(self) -> dict[str, Any]:
        """{"checkpointed_layers": "done/total"} once training began, else {}."""
        return {"checkpointed_layers": f"{self.layers[0]}/{self.layers[1]}"} if self.layers else {}
