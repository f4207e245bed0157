"""The GPU training engine: Unsloth's vision fine-tuning workflow, driven by the job spec.

It follows Unsloth's vision notebooks step by step, with every argument taken
from the spec (nothing hard-coded):

    FastVisionModel.from_pretrained -> FastVisionModel.get_peft_model (not for full
    fine-tuning) -> FastVisionModel.for_training -> UnslothVisionDataCollator ->
    TRL SFTTrainer(SFTConfig(remove_unused_columns=False, dataset_text_field="",
    dataset_kwargs={"skip_prepare_dataset": True}, max_length=...)) -> train ->
    save_pretrained (adapter + processor) / save_pretrained_merged("merged_16bit").

`unsloth` is imported inside `train_unsloth`, before transformers/trl/peft are
touched in that process, as Unsloth requires; importing this module is cheap
and safe on a CPU machine.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from vlm_ray.config import JobSpec
from vlm_ray.models.batched_rope_index import enable_batched_rope_index
from vlm_ray.models.compiled_vision import compile_vision_blocks
from vlm_ray.models.families import Family, family_of
from vlm_ray.models.fp8_frozen_linear import (
    check_fp8_training_device,
    convert_lora_base_layers_to_fp8,
    fp8_layer_count,
)
from vlm_ray.models.fused_lora_mlp import enable_fused_lora_mlp
from vlm_ray.models.graphed_decoder_layers import enable_graphed_decoder_layers
from vlm_ray.models.host_input_embedding import (
    host_embedding_counts,
    move_input_embedding_to_host,
    with_host_embedding_lookup,
)
from vlm_ray.models.lora_add_without_copy import lora_add_counts, set_lora_add_without_copy
from vlm_ray.models.packed_vision_attention import enable_packed_vision_attention
from vlm_ray.models.remote_code import check_remote_code
from vlm_ray.models.resolve import resolve_model_path
from vlm_ray.storage import Store
from vlm_ray.train.activation_checkpointing import trainer_checkpointing_kwargs
from vlm_ray.train.label_span_logits import label_span_counts, with_label_span_logits
from vlm_ray.train.saving import save_trained_model
from vlm_ray.train.trainer_args import common_trainer_kwargs

log = logging.getLogger(__name__)


def set_loss_chunks(chunks: int | None) -> None:
    """How many row chunks Unsloth's fused cross-entropy splits the batch into (None: its own
    choice from free memory, one chunk when there is room). Unsloth reads
    UNSLOTH_CE_LOSS_N_CHUNKS when it is imported; an already imported module is told directly."""
    if chunks is None:
        return
    os.environ["UNSLOTH_CE_LOSS_N_CHUNKS"] = str(chunks)
    loaded = sys.modules.get("unsloth_zoo.fused_losses.cross_entropy_loss")
    if loaded is not None:
        loaded.N_CHUNKS = str(chunks)


def load_unsloth_model(spec: JobSpec, model_path: str) -> tuple[Any, Any]:
    """FastVisionModel.from_pretrained (+ get_peft_model unless full fine-tuning) + for_training."""
    # before from_pretrained: it would run Python files shipped in the folder
    check_remote_code(spec.model.name, model_path, spec.model.trust_remote_code)
    if spec.train.fp8:
        check_fp8_training_device()  # before minutes of loading: the answer needs no weights
    set_loss_chunks(spec.train.loss_chunks)
    import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)
    from unsloth import FastVisionModel

    m, lora = spec.model, spec.lora
    model, processor = FastVisionModel.from_pretrained(
        model_path,
        max_seq_length=m.max_seq_length,
        load_in_4bit=m.load_in_4bit,
        load_in_8bit=m.load_in_8bit,
        # Unsloth treats load_in_16bit as "do not quantize"; 4/8-bit win when asked for.
        load_in_16bit=m.load_in_16bit and not (m.load_in_4bit or m.load_in_8bit),
        full_finetuning=m.full_finetuning,
        use_gradient_checkpointing=m.use_gradient_checkpointing,
        # train.host_input_embedding moves the table itself (and without Unsloth's per-step sync)
        offload_embedding=False if spec.train.host_input_embedding else m.offload_embedding,
        trust_remote_code=m.trust_remote_code,
        **({"attn_implementation": m.attn_implementation} if m.attn_implementation else {}),
    )
    if not m.full_finetuning:
        model = FastVisionModel.get_peft_model(
            model,
            finetune_vision_layers=lora.finetune_vision_layers,
            finetune_language_layers=lora.finetune_language_layers,
            finetune_attention_modules=lora.finetune_attention_modules,
            finetune_mlp_modules=lora.finetune_mlp_modules,
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            bias=lora.bias,
            use_rslora=lora.use_rslora,
            loftq_config=lora.loftq_config,
            random_state=lora.random_state,
            target_modules=lora.target_modules,
            use_gradient_checkpointing=m.use_gradient_checkpointing,
        )
    FastVisionModel.for_training(model)
    enable_batched_rope_index(model)
    # One attention call per vision layer instead of one per image, each with device syncs
    # (3 per layer call, found on the GPU: docs/benchmarks.md, training run 9).
    enable_packed_vision_attention(model)
    if spec.train.fp8:
        # Before the fused MLP would take the MLPs: its kernel multiplies bf16 weights itself,
        # so with train.fp8 the MLPs stay on PEFT's layers, whose base GEMMs become float8.
        convert_lora_base_layers_to_fp8(
            model,
            spec.train.fp8_scaling,
            keep_bf16_on_host=spec.save.merged_16bit,
            min_features=spec.train.fp8_min_features,
        )
        if spec.train.fused_lora_mlp:
            log.info("train.fp8: train.fused_lora_mlp left off (its kernel reads bf16 weights)")
    elif spec.train.fused_lora_mlp and not m.full_finetuning:
        # Unsloth's own fused LoRA MLP, which FastVisionModel leaves out: two wide activations
        # per token kept instead of three, fewer kernels (docs/benchmarks.md, run 11).
        enable_fused_lora_mlp(model, recompute=spec.train.recompute_mlp)
    if spec.train.cuda_graphs:
        # The batch-4 step is host-bound: one graph launch per layer instead of its many kernels.
        enable_graphed_decoder_layers(model)
    if spec.train.compile_vision:
        # After every module swap above: the compiled graphs trace what the blocks are now.
        compile_vision_blocks(model)
    return model, processor


def build_unsloth_collator(spec: JobSpec, model: Any, processor: Any, family: Family) -> Any:
    """UnslothVisionDataCollator with the family's response markers and the spec's image bound."""
    from unsloth.trainer import UnslothVisionDataCollator

    return UnslothVisionDataCollator(
        model,
        processor,
        max_seq_length=spec.model.max_seq_length,
        train_on_responses_only=spec.train.train_on_responses_only,
        instruction_part=family.instruction_part,
        response_part=family.response_part,
        # Prepared images are already within data.image_max_size and patch-snapped;
        # bounding the long side by the same number makes this a no-op safety net
        # rather than Unsloth's default resize to a model-specific size.
        resize=spec.data.image_max_size,
        resize_dimension="max",
        pad_to_multiple_of=spec.train.pad_to_multiple_of,
    )


def sft_config(spec: JobSpec, output_dir: Path, bf16_supported: bool) -> Any:
    """TRL SFTConfig with the notebook's vision settings and every trainer knob from spec.train."""
    from trl import SFTConfig

    t = spec.train
    bf16 = t.bf16 if t.bf16 is not None else (bf16_supported and not t.fp16)
    fp16 = t.fp16 if t.fp16 is not None else not bf16
    return SFTConfig(
        **common_trainer_kwargs(spec, output_dir, bf16, fp16),
        # what Unsloth's vision notebooks require for a collator-driven VLM dataset
        # (remove_unused_columns=False comes with the common knobs)
        dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=spec.model.max_seq_length,
        # SFTConfig defaults gradient_checkpointing to true: without this, "false" would still
        # checkpoint every layer through the Trainer
        **trainer_checkpointing_kwargs(spec),
    )


def prepared_train_dataset(files: list[str], workdir: Path) -> Any:
    """The prepared train split (local_train_shards' files) as a datasets.Dataset of collator examples.

    A datasets.Dataset, not the CPU engine's torch Dataset: Unsloth's patched TRL SFTTrainer
    accepts only Dataset/IterableDataset or a list. The shards are memory-mapped Arrow (not
    held in memory), in the same shard and row order as the CPU engine; each row becomes
    {"messages": [...], "images": [png/jpeg bytes]} only when the data loader
    reads it, and the collator decodes the image there.
    """
    from datasets import Dataset

    ds = Dataset.from_parquet(
        files, columns=["id", "image", "messages"], cache_dir=str(workdir / "prepared-train/cache")
    )
    return ds.with_transform(_as_collator_examples)


def local_train_shards(store: Store, workdir: Path) -> list[str]:
    """The prepared train shards as local parquet files, in shard order (fetched once)."""
    from vlm_ray.train.dataset import list_prepared_shards

    local = workdir / "prepared-train"
    files = []
    for key, _rows, sha256 in list_prepared_shards(store, "train"):
        # named by content hash where the manifest has one, so a re-prepared run is never stale
        dest = local / (f"{sha256}.parquet" if sha256 else Path(key).name)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(store.read_bytes(key))
        files.append(str(dest))
    return files


def _as_collator_examples(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {
        "id": batch["id"],
        "messages": [json.loads(m) for m in batch["messages"]],
        "images": [[img] for img in batch["image"]],
    }


def train_unsloth(
    spec: JobSpec, store: Store, workdir: Path, resume_from: str | None, callbacks: list
) -> dict:
    """Fine-tune with Unsloth on the prepared train split; save the adapter (and merged model) to the store."""
    import torch
    import unsloth  # noqa: F401  (first in this process, before transformers/trl/peft)
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer
    from unsloth import is_bf16_supported

    t0 = time.time()
    workdir = Path(workdir)
    model_path = resolve_model_path(spec.model.name, spec.run.s3_endpoint_url)
    family = family_of(model_path)
    log.info(
        "train[unsloth]: start model=%s family=%s 4bit=%s 8bit=%s full=%s run=%s",
        spec.model.name,
        family.name,
        spec.model.load_in_4bit,
        spec.model.load_in_8bit,
        spec.model.full_finetuning,
        store.uri,
    )
    model, processor = load_unsloth_model(spec, model_path)
    lora_add = set_lora_add_without_copy(
        spec.train.lora_add_without_copy and not spec.model.full_finetuning
    )
    host = move_input_embedding_to_host(model) if spec.train.host_input_embedding else None
    collator = build_unsloth_collator(spec, model, processor, family)
    files = local_train_shards(store, workdir)
    train_ds = prepared_train_dataset(files, workdir)
    torch.cuda.reset_peak_memory_stats()
    trainer_cls = SFTTrainer
    if spec.train.group_by_length:
        from vlm_ray.train.length_grouping import lengths_of_parquet, with_length_grouping

        trainer_cls = with_length_grouping(SFTTrainer, lengths_of_parquet(files), spec.train.seed)
    trainer = trainer_cls(
        model=model,
        processing_class=processor,
        data_collator=collator,
        train_dataset=train_ds,
        args=sft_config(spec, workdir / "trainer", is_bf16_supported()),
        callbacks=list(callbacks),
    )
    with_host_embedding_lookup(trainer, host)
    label_span = with_label_span_logits(trainer, model, spec.train)
    # MetricsLog (from the stage) prints the progress line; the Trainer's dict printer would repeat it.
    trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=resume_from)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    fp8_layers = fp8_layer_count(model)  # before the save, which may restore bf16 layers

    outputs = save_unsloth_model(spec, store, workdir, model, processor)
    summary = {
        "engine": "unsloth",
        "family": family.name,
        "model": spec.model.name,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "peak_gpu_memory_gib": round(peak_gib, 2),
        "rows": len(train_ds),
        "resumed_from": resume_from,
        **host_embedding_counts(host),
        "fp8_base_layers": fp8_layers,
        **label_span_counts(label_span),
        **lora_add_counts(lora_add),
        **outputs,
    }
    log.info(
        "train[unsloth]: done steps=%d loss=%.4f %.1fs peak=%.2fGiB outputs=%s",
        summary["global_step"],
        summary["train_loss"],
        time.time() - t0,
        peak_gib,
        {k: v for k, v in outputs.items() if k.endswith("_uri")},
    )
    return summary


def save_unsloth_model(
    spec: JobSpec, store: Store, workdir: Path, model: Any, processor: Any
) -> dict[str, str]:
    """Adapter (save_pretrained + processor) and/or merged 16-bit model, uploaded under <run>/model/."""
    return save_trained_model(spec, store, workdir, model, processor, _save_merged_unsloth)


def _save_merged_unsloth(model: Any, processor: Any, merged_dir: Path) -> None:
    model.save_pretrained_merged(str(merged_dir), processor, save_method="merged_16bit")
