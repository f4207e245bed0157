"""Finding the parts of a loaded vision-language model that the inference speed-ups change."""

from __future__ import annotations

from typing import Any


def unwrapped(model: Any) -> Any:
    """The transformers model under a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def inner_module(model: Any, name: str) -> Any | None:
    """The sub-module `name` of a vision-language model, or None.

    transformers keeps the towers on the inner `model` (`...ForConditionalGeneration.model.visual`);
    a bare inner model has them on itself.
    """
    base = unwrapped(model)
    for holder in (getattr(base, "model", None), base):
        found = getattr(holder, name, None)
        if found is not None:
            return found
    return None
