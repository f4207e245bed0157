"""The output head and its loss over the label span only (spec train.label_span_logits).

Why: with train.train_on_responses_only the labels cover the answer alone, and the image's tokens
come first: at the 7B shape, 448 px, 256 of a ~320-token sample are image tokens. The output head
(152,064 wide at 7B) still multiplies every position, in the forward and for the input gradient,
and the loss upcasts all those logits to float32, though the loss ignores ~90% of them. At batch
32 the step is bound by the GPU's arithmetic (docs/benchmarks.md, runs 22 and 24), so that work
is time.

How: after the collator, each batch's labels are cut to the span from the batch's first labelled
position minus one to the end, and the batch asks the model for logits over that span only
(transformers' `logits_to_keep`: the last K positions). Every model family here computes its
causal-LM loss by shifting labels one position inside what it is given (transformers'
ForCausalLMLoss and Unsloth's fused loss alike), so each labelled token is still predicted from
the same hidden state, and the loss is the same sum over the same tokens divided by the same
count. The cut is made on the host, in the data loader, because it needs the span's length as a
number: on the training loop that would be a GPU sync per step.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any

import torch

from vlm_ray.models.submodules import unwrapped
from vlm_ray.train.collator import IGNORE_INDEX

if TYPE_CHECKING:
    from vlm_ray.config import TrainSpec

log = logging.getLogger(__name__)


def label_span(labels: torch.Tensor, multiple: int | None = None) -> int:
    """How many trailing positions the loss needs: from the first labelled one minus one to the end.

    The full length when nothing is labelled or the first position is. Rounded up to a multiple
    (capped at the length) so the output head sees a few fixed shapes, not one per batch.
    """
    length = labels.shape[-1]
    labelled = (labels != IGNORE_INDEX).reshape(-1, length).any(dim=0).nonzero()
    if labelled.numel() == 0:
        return length
    keep = length - max(int(labelled[0, 0]) - 1, 0)
    if multiple:
        keep = -(-keep // multiple) * multiple
    return min(keep, length)


def trim_to_label_span(batch: dict[str, Any], multiple: int | None = None) -> dict[str, Any]:
    """Cut batch["labels"] to its label span and set logits_to_keep to match (in place; returned)."""
    labels = batch.get("labels")
    if labels is None:
        return batch
    keep = label_span(labels, multiple)
    if keep < labels.shape[-1]:
        batch["labels"] = labels[..., -keep:].contiguous()
        batch["logits_to_keep"] = keep
    return batch


class LabelSpanCollator:
    """Wraps a data collator: every batch it makes comes out cut to its label span."""

    def __init__(self, inner: Any, multiple: int | None = None) -> None:
        self.inner, self.multiple = inner, multiple

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        return trim_to_label_span(self.inner(examples), self.multiple)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's own forward (under PEFT's wrapper) takes transformers' logits_to_keep."""
    return "logits_to_keep" in inspect.signature(unwrapped(model).forward).parameters


class LabelSpanCount:
    """How many of the model's forwards came with a cut batch (the run summary's record)."""

    def __init__(self) -> None:
        self.forwards = self.cut = 0

    def __call__(self, _module: Any, _args: tuple, kwargs: dict[str, Any]) -> None:
        # a forward pre-hook: reads the call's keywords, changes nothing, no GPU work
        self.forwards += 1
        self.cut += "logits_to_keep" in kwargs

    def as_dict(self) -> dict[str, int]:
        return {"forwards": self.forwards, "cut": self.cut}


def with_label_span_logits(trainer: Any, model: Any, train: TrainSpec) -> LabelSpanCount | None:
    """With train.label_span_logits, have trainer's batches cut to their label span (see the
    module docstring), rounded up to train.pad_to_multiple_of.

    Returns the counter of the model's forwards (None when the setting is off or the model
    cannot take the cut). Set after the trainer is built, as the host embedding collator is:
    Unsloth's trainer decides things at construction from the collator's class.
    """
    if not train.label_span_logits:
        return None
    if not accepts_logits_to_keep(model):
        log.warning(
            "train.label_span_logits: %s's forward takes no logits_to_keep; the output head "
            "runs over every position",
            type(unwrapped(model)).__name__,
        )
        return None
    trainer.data_collator = LabelSpanCollator(trainer.data_collator, train.pad_to_multiple_of)
    count = LabelSpanCount()
    model.register_forward_pre_hook(count, with_kwargs=True)
    log.info(
        "train.label_span_logits: the output head and the loss run from each batch's first "
        "labelled position to its end"
    )
    return count


def label_span_counts(count: LabelSpanCount | None) -> dict[str, dict[str, int]]:
    """For a run's summary: how many forwards came with a cut batch ({} when the setting is off)."""
    return {} if count is None else {"label_span_logits": count.as_dict()}
