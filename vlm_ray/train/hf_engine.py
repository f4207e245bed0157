"""The CPU training engine: transformers.Trainer + PEFT, the same recipe as the Unsloth engine without Unsloth.

    AutoModelForImageTextToText.from_pretrained -> peft.get_peft_model (LoRA targets from the
    four finetune_* switches) or all weights (full fine-tuning) -> VisionSFTCollator -> Trainer
    over the prepared shards -> save_pretrained (adapter + processor) / merge_and_unload.

It also runs on a GPU when train.engine=hf (bf16 where supported, 4/8-bit
through bitsandbytes); on CPU it trains in fp32 unless bf16 is asked for and
the CPU supports it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from vlm_ray.config import JobSpec, LoraSpec
from vlm_ray.models.batched_rope_index import enable_batched_rope_index
from vlm_ray.models.families import Family, family_of
from vlm_ray.models.fp8_frozen_linear import (
    check_fp8_training_device,
    convert_lora_base_layers_to_fp8,
    fp8_layer_count,
    fp8_weight_count,
)
from vlm_ray.models.host_input_embedding import (
    host_embedding_counts,
    move_input_embedding_to_host,
    with_host_embedding_lookup,
)
from vlm_ray.models.packed_vision_attention import enable_packed_vision_attention
from vlm_ray.models.remote_code import check_remote_code
from vlm_ray.models.resolve import resolve_model_path
from vlm_ray.storage import Store
from vlm_ray.train.activation_checkpointing import trainer_checkpointing_kwargs
from vlm_ray.train.collator import VisionSFTCollator
from vlm_ray.train.dataset import PreparedShardsDataset
from vlm_ray.train.label_span_logits import label_span_counts, with_label_span_logits
from vlm_ray.train.length_grouping import with_length_grouping
from vlm_ray.train.peft_targets import lora_target_modules
from vlm_ray.train.saving import save_trained_model
from vlm_ray.train.trainer_args import common_trainer_kwargs

log = logging.getLogger(__name__)


def choose_precision(spec: JobSpec) -> tuple[torch.dtype, bool, bool, str]:
    """(weight dtype, bf16 autocast, fp16 autocast, why) for this machine and train.bf16/fp16."""
    t = spec.train
    if torch.cuda.is_available():
        bf16_ok = torch.cuda.is_bf16_supported()
        bf16 = t.bf16 if t.bf16 is not None else (bf16_ok and not t.fp16)
        fp16 = t.fp16 if t.fp16 is not None else not bf16
        dtype = torch.bfloat16 if bf16 and spec.model.load_in_16bit else torch.float32
        if fp16:
            dtype = torch.float32  # fp16 mixed precision needs fp32 master weights
        return dtype, bf16, fp16, f"CUDA: bf16={bf16} fp16={fp16}, weights {dtype}"
    bf16_ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if t.fp16:
        log.warning("train.fp16=true is ignored on CPU (no fp16 autocast there): fp32")
    if t.bf16 and not bf16_ok:
        log.warning("train.bf16=true, but this CPU has no bf16 support: fp32")
    bf16 = bool(t.bf16) and bf16_ok
    why = (
        "CPU: fp32 weights, bf16 autocast (train.bf16=true, supported by this CPU)"
        if bf16
        else "CPU: fp32 (set train.bf16=true for bf16 autocast where the CPU supports it)"
    )
    return torch.float32, bf16, False, why


def apply_lora(model: Any, lora: LoraSpec, family: Family) -> Any:
    """peft.get_peft_model with the spec's LoRA knobs; lora.random_state seeds the adapter init."""
    from peft import LoftQConfig, LoraConfig, get_peft_model

    targets = lora_target_modules(model, lora, family)
    extra: dict[str, Any] = {}
    if lora.loftq_config:
        extra = {"init_lora_weights": "loftq", "loftq_config": LoftQConfig(**lora.loftq_config)}
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        target_modules=targets,
        task_type="CAUSAL_LM",
        **extra,
    )
    torch.manual_seed(lora.random_state)
    return get_peft_model(model, config)


def load_hf_model(spec: JobSpec, model_path: str, family: Family) -> tuple[Any, Any, str]:
    """(trainable model, processor, precision note): base model + LoRA, or all weights for full fine-tuning."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    m = spec.model
    # before from_pretrained: it would run Python files shipped in the folder
    check_remote_code(m.name, model_path, m.trust_remote_code)
    if spec.train.fp8:
        check_fp8_training_device()  # before minutes of loading: the answer needs no weights
    dtype, _, _, why = choose_precision(spec)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.load_in_4bit or m.load_in_8bit:
        if not torch.cuda.is_available():
            raise ValueError(
                f"model.load_in_{'4' if m.load_in_4bit else '8'}bit needs a CUDA GPU (bitsandbytes); "
                "set it to false to train on CPU"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=m.load_in_4bit,
            load_in_8bit=m.load_in_8bit,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_type="nf4",
        )
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=m.trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
    if m.full_finetuning:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if m.load_in_4bit or m.load_in_8bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(m.use_gradient_checkpointing)
            )
        model = apply_lora(model, spec.lora, family)
        if spec.train.fp8:
            convert_lora_base_layers_to_fp8(
                model,
                spec.train.fp8_scaling,
                keep_bf16_on_host=spec.save.merged_16bit,
                min_features=spec.train.fp8_min_features,
            )
    enable_batched_rope_index(model)
    enable_packed_vision_attention(model)  # one attention call per vision layer, not per image
    return model, processor, why


def training_arguments(spec: JobSpec, output_dir: Path, bf16: bool, fp16: bool) -> Any:
    """TrainingArguments from spec.train (the same knobs the Unsloth engine gives SFTConfig)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        **common_trainer_kwargs(spec, output_dir, bf16, fp16),
        dataloader_pin_memory=torch.cuda.is_available(),
        **trainer_checkpointing_kwargs(spec, {"use_reentrant": False}),
        disable_tqdm=True,  # MetricsLog prints one progress line per logging step
    )


def train_hf(
    spec: JobSpec, store: Store, workdir: Path, resume_from: str | None, callbacks: list
) -> dict:
    """Fine-tune with transformers.Trainer + PEFT on the prepared train split; save the model to the store."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    t0 = time.time()
    workdir = Path(workdir)
    model_path = resolve_model_path(spec.model.name, spec.run.s3_endpoint_url)
    family = family_of(model_path)
    model, processor, precision = load_hf_model(spec, model_path, family)
    _, bf16, fp16, _ = choose_precision(spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # train.fp8 keeps frozen base weights as buffers (uint8 bits), not parameters: count them too
    total = sum(p.numel() for p in model.parameters()) + fp8_weight_count(model)
    log.info(
        "train[hf]: start model=%s family=%s %s threads=%d trainable=%d/%d (%s) run=%s",
        spec.model.name,
        family.name,
        precision,
        torch.get_num_threads(),
        trainable,
        total,
        "full fine-tuning" if spec.model.full_finetuning else f"LoRA r={spec.lora.r}",
        store.uri,
    )
    host = move_input_embedding_to_host(model) if spec.train.host_input_embedding else None
    dataset = PreparedShardsDataset(store, "train", workdir.parent / "shards")
    collator = VisionSFTCollator(
        processor,
        family,
        train_on_responses_only=spec.train.train_on_responses_only,
        max_seq_length=spec.model.max_seq_length,
        image_max_size=spec.data.image_max_size,
        dtype=None if spec.model.load_in_4bit or spec.model.load_in_8bit else model.dtype,
        pad_to_multiple_of=spec.train.pad_to_multiple_of,
    )
    trainer_cls = Trainer
    if spec.train.group_by_length:
        trainer_cls = with_length_grouping(Trainer, dataset.lengths(), spec.train.seed)
    trainer = trainer_cls(
        model=model,
        args=training_arguments(spec, workdir / "trainer", bf16, fp16),
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=list(callbacks),
    )
    with_host_embedding_lookup(trainer, host)
    label_span = with_label_span_logits(trainer, model, spec.train)
    # MetricsLog prints the progress line; the Trainer's own dict printer would repeat it.
    trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=resume_from)
    fp8_layers = fp8_layer_count(model)  # before the save, which may restore bf16 layers
    outputs = save_hf_model(spec, store, workdir, trainer.model, processor)
    summary = {
        "engine": "hf",
        "family": family.name,
        "model": spec.model.name,
        "precision": precision,
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "train_loss": result.training_loss,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "trainable_params": trainable,
        "total_params": total,
        "rows": len(dataset),
        "resumed_from": resume_from,
        **host_embedding_counts(host),
        "fp8_base_layers": fp8_layers,
        **label_span_counts(label_span),
        **outputs,
    }
    log.info(
        "train[hf]: done steps=%d loss=%.4f %.1fs outputs=%s",
        summary["global_step"],
        summary["train_loss"],
        time.time() - t0,
        {k: v for k, v in outputs.items() if k.endswith("_uri")},
    )
    return summary


def save_hf_model(
    spec: JobSpec, store: Store, workdir: Path, model: Any, processor: Any
) -> dict[str, str]:
    """Adapter (save_pretrained + processor) and/or merged model, uploaded under <run>/model/."""
    return save_trained_model(spec, store, workdir, model, processor, _save_merged_hf)


def _save_merged_hf(model: Any, processor: Any, merged_dir: Path) -> None:
    # merge_and_unload folds the adapter into the base weights in place; the adapter is saved already.
    merged = model.merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
