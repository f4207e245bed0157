"""The input embedding table in host memory while training (spec train.host_input_embedding).

Under LoRA the input embedding is frozen, and a step reads only its batch's rows of it: at the
7B shape the table is 1.02 GiB of GPU memory (bf16, 152,064 x 3,584) that sits under the peak
(docs/benchmarks.md, run 11's memory sites), while a batch-4 step reads 1,264 of its rows
(9.1 MB). Here the table stays in host memory and the rows are looked up where the batch is
collated, in the data loader's worker processes; they reach the GPU with the rest of the batch,
under the key HOST_EMBEDS_KEY, and the model's embedding hands them on instead of looking up.

Unsloth's `model.offload_embedding` moves the same table but looks up on the training loop's
thread after copying the ids back from the GPU (a host-device sync every step) and sends the
rows back up: 64% longer steps at 7B (run 11). Here the training loop does no lookup and no
sync; it copies 9.1 MB more per step with the batch. The lookup itself took 1.2-1.7 ms on one
core of the 2-core CI VM at that shape (bench/host_embedding_lookup.py), in a worker
(train.dataloader_num_workers >= 1; with 0 it runs on the training loop's thread).

Left alone (a warning says why): a table tied to the output head (moving it would move
lm_head), a trainable table (full fine-tuning or LoRA on the embedding), and a module that is
not a torch Embedding.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlm_ray.models.submodules import unwrapped

log = logging.getLogger(__name__)

# The batch key the collator puts the looked-up rows under; the model's pre-hook takes it out.
HOST_EMBEDS_KEY = "vlm_ray_host_input_embeds"


@dataclass
class HostInputEmbedding:
    """A model's input embedding, moved to host memory, and the counts of how its rows were found.

    served_from_batch: forwards whose rows came with the batch (the collator looked them up);
    looked_up_here: forwards that looked up themselves (no rows in the batch: generation, or a
    call with other ids), which copies the ids to the host first.
    """

    module: torch.nn.Embedding
    served_from_batch: int = 0
    looked_up_here: int = 0
    _pending: torch.Tensor | None = field(default=None, repr=False)

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The rows for input_ids, computed on the host by the table's own class forward."""
        with torch.no_grad():
            return type(self.module).forward(self.module, input_ids.to(self.module.weight.device))


def _why_not(embedding: Any, output_embedding: Any) -> str | None:
    if not isinstance(embedding, torch.nn.Embedding):
        return f"the input embedding is a {type(embedding).__name__}, not a torch Embedding"
    if embedding.weight.requires_grad:
        return "the input embedding is trained (full fine-tuning or LoRA on it)"
    head = getattr(output_embedding, "weight", None)
    if head is not None and head.data_ptr() == embedding.weight.data_ptr():
        return "the input embedding is tied to lm_head, which the GPU needs"
    return None


def move_input_embedding_to_host(model: Any) -> HostInputEmbedding | None:
    """Move model's input embedding table to host memory and hook the model to take its rows
    from the batch (see with_host_embedding_lookup). None, with a warning, where it cannot move."""
    embedding = model.get_input_embeddings()
    output_embedding = model.get_output_embeddings()
    reason = _why_not(embedding, output_embedding)
    if reason is not None:
        log.warning("train.host_input_embedding: left on its device: %s", reason)
        return None
    was = embedding.weight.device
    nbytes = embedding.weight.numel() * embedding.weight.element_size()
    embedding.to("cpu")
    host = HostInputEmbedding(embedding)
    _keep_on_host(embedding)
    embedding.forward = types.MethodType(_forward_taking_batch_rows(host), embedding)
    # On the model the Trainer calls, and on the transformers model inside a PEFT wrapper in
    # case something calls that one directly: the key must never reach the model's forward.
    inner = unwrapped(model)
    for hooked in {id(model): model, id(inner): inner}.values():
        hooked.register_forward_pre_hook(_take_rows_from_kwargs(host), with_kwargs=True)
        # always_call: rows left by a forward that failed must not serve the next call
        hooked.register_forward_hook(_drop_unused_rows(host), always_call=True)
    if was.type == "cuda":
        torch.cuda.empty_cache()
    log.info(
        "train.host_input_embedding: the input embedding table (%.2f GiB) is in host memory "
        "(was on %s); the data loader looks its rows up",
        nbytes / 2**30,
        was,
    )
    return host


def _forward_taking_batch_rows(host: HostInputEmbedding) -> Callable:
    def forward(module: torch.nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
        rows = host._pending
        if rows is not None and rows.shape[:-1] == input_ids.shape:
            host._pending = None
            host.served_from_batch += 1
            return rows.to(input_ids.device, non_blocking=True)
        # Other ids than the batch's (generation, a single token's lookup): copy them over.
        host.looked_up_here += 1
        return host.lookup(input_ids).to(input_ids.device)

    return forward


def _take_rows_from_kwargs(host: HostInputEmbedding) -> Callable:
    def pre_hook(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if HOST_EMBEDS_KEY not in kwargs:
            return None
        kwargs = dict(kwargs)
        host._pending = kwargs.pop(HOST_EMBEDS_KEY)
        return args, kwargs

    return pre_hook


def _drop_unused_rows(host: HostInputEmbedding) -> Callable:
    def hook(_module: Any, _args: tuple, _output: Any) -> None:
        host._pending = None

    return hook


def _keep_on_host(embedding: torch.nn.Embedding) -> None:
    """Make model.to(device) / .cuda() (the Trainer's and accelerate's device placement) leave
    this table in host memory; dtype changes and host-side conversions still apply."""

    def _apply(module: torch.nn.Module, fn: Callable, recurse: bool = True) -> torch.nn.Module:
        probe = fn(torch.empty(0, dtype=module.weight.dtype))
        if probe.device.type == "cpu":
            return torch.nn.Module._apply(module, fn, recurse)

        def dtype_only(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype=probe.dtype) if t.is_floating_point() else t

        return torch.nn.Module._apply(module, dtype_only, recurse)

    embedding._apply = types.MethodType(_apply, embedding)


class HostEmbeddingCollator:
    """A data collator that adds the batch's input embedding rows, looked up in host memory.

    It runs where the wrapped collator runs (the data loader's workers), and forwards every
    other attribute to the wrapped collator, so code that reads its settings still finds them.
    """

    def __init__(self, collator: Callable, host: HostInputEmbedding) -> None:
        self.collator = collator
        self.host = host

    def __call__(self, examples: list[Any]) -> Any:
        batch = self.collator(examples)
        batch[HOST_EMBEDS_KEY] = self.host.lookup(batch["input_ids"])
        return batch

    def __getattr__(self, name: str) -> Any:
        # only called for names not found on this object: the wrapped collator's settings
        if name in ("collator", "host"):
            raise AttributeError(name)
        return getattr(self.collator, name)


def with_host_embedding_lookup(trainer: Any, host: HostInputEmbedding | None) -> None:
    """Have trainer's data collator add the rows of host's table to every batch (no-op for None).

    Set after the trainer is built: Unsloth's trainer decides things at construction from the
    collator's class.
    """
    if host is None:
        return
    trainer.data_collator = HostEmbeddingCollator(trainer.data_collator, host)
    if trainer.args.dataloader_num_workers == 0:
        log.warning(
            "train.host_input_embedding: with train.dataloader_num_workers: 0 the rows are "
            "looked up on the training loop's thread (1.2-1.7 ms per 7B batch-4 step on one "
            "CI core); set it to 1 or more to do it beside the GPU step"
        )


def host_embedding_counts(host: HostInputEmbedding | None) -> dict[str, dict[str, int]]:
    """For a run's summary: how the table's rows were found ({} when it stayed on its device)."""
    if host is None:
        return {}
    return {
        "host_input_embedding": {
            "served_from_batch": host.served_from_batch,
            "looked_up_here": host.looked_up_here,
        }
    }
