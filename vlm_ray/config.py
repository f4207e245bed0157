"""The job spec: one YAML file, validated by typed models, drives every stage.

Field names follow Unsloth's own (``FastVisionModel.from_pretrained``,
``get_peft_model``, ``UnslothVisionDataCollator``, TRL ``SFTConfig``) so a
notebook's arguments map one to one. Every model forbids unknown keys, so a
typo fails before anything starts, with the dotted path of the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSpec(_Section):
    """Where this run's outputs live."""

    uri: str = Field(
        "runs/demo",
        description="Run root: a local path, file://..., or s3://bucket/prefix. Every stage reads and writes under it.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for MinIO/Ceph/rclone; default: AWS_ENDPOINT_URL or AWS."
    )
    name: str | None = Field(
        None, description="Human-readable run name (defaults to the last part of run.uri)."
    )


class ModelSpec(_Section):
    """What FastVisionModel.from_pretrained receives."""

    name: str = Field(
        ..., description="Hub id, local folder, or s3:// folder of a Hugging Face model."
    )
    max_seq_length: int = Field(
        2048, ge=16, description="Longest tokenised example (prompt + image tokens + answer)."
    )
    load_in_4bit: bool = Field(False, description="4-bit QLoRA through bitsandbytes (GPU only).")
    load_in_8bit: bool = Field(False, description="8-bit weights through bitsandbytes (GPU only).")
    load_in_16bit: bool = Field(True, description="16-bit weights (bf16 where supported).")
    full_finetuning: bool = Field(False, description="Train all weights instead of a LoRA adapter.")
    use_gradient_checkpointing: bool | Literal["unsloth"] = Field(
        "unsloth",
        description=(
            'Activation checkpointing: "unsloth" (Unsloth\'s, offloaded to host memory), True or '
            "False (none, in the Trainer too). Measured at 7B, 4-bit, batch 4 on an H200: "
            '"unsloth" 5.12 samples/s at 7.88 GiB; True with train.checkpoint_scope: vision 9.23 at '
            "13.92; False 10.96 at 19.59 (docs/benchmarks.md)."
        ),
    )
    offload_embedding: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "Keep the input embedding table in host memory (Unsloth engine): lookups run there "
            'and only the looked-up rows reach the GPU. "auto": Unsloth decides from free '
            "memory. Measured at 7B, batch 4 (H200): 1 GiB less, but 64% longer steps "
            "(docs/benchmarks.md run 11)."
        ),
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow model code from the model folder (needed by DeepSeek-OCR). Off by default: it runs code shipped with the weights.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; default: the library's choice."
    )

    @model_validator(mode="after")
    def _one_precision(self) -> ModelSpec:
        chosen = [k for k in ("load_in_4bit", "load_in_8bit") if getattr(self, k)]
        if len(chosen) > 1:
            raise ValueError("choose at most one of load_in_4bit, load_in_8bit")
        if chosen and self.full_finetuning:
            raise ValueError(f"full_finetuning cannot be combined with {chosen[0]}")
        return self


class LoraSpec(_Section):
    """What FastVisionModel.get_peft_model receives (ignored when full_finetuning)."""

    finetune_vision_layers: bool = Field(True, description="Adapt the vision tower.")
    finetune_language_layers: bool = Field(True, description="Adapt the language model.")
    finetune_attention_modules: bool = Field(True, description="Adapt attention projections.")
    finetune_mlp_modules: bool = Field(True, description="Adapt MLP projections.")
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on LoRA inputs.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    loftq_config: dict[str, Any] | None = Field(
        None, description="LoftQ initialisation settings, passed through."
    )
    random_state: int = Field(3407, description="Seed for adapter initialisation.")
    target_modules: list[str] | str | None = Field(
        None,
        description='Explicit module names or a regex; overrides the four finetune_* switches. "all-linear" is accepted.',
    )

    @model_validator(mode="after")
    def _something_to_train(self) -> LoraSpec:
        if self.target_modules is None:
            if not (self.finetune_vision_layers or self.finetune_language_layers):
                raise ValueError(
                    "finetune_vision_layers and finetune_language_layers are both false: nothing to train"
                )
            if not (self.finetune_attention_modules or self.finetune_mlp_modules):
                raise ValueError(
                    "finetune_attention_modules and finetune_mlp_modules are both false: nothing to train"
                )
        return self


DataFormat = Literal["auto", "hf", "parquet", "jsonl", "imagefolder"]


class DataSpec(_Section):
    """Where the examples come from and how they become chat messages."""

    source: str = Field(
        ...,
        description="A local path or s3:// URI: HF dataset folder (or hub id), parquet file/folder, JSONL file, or image folder.",
    )
    format: DataFormat = Field("auto", description="auto|hf|parquet|jsonl|imagefolder.")
    split: str | None = Field(
        None, description="Split of a DatasetDict / hub dataset to read (default: train)."
    )
    image_column: str = Field(
        "image", description="Column holding the image: {bytes, path} struct, bytes, or a path."
    )
    text_column: str = Field(
        "text", description="Column holding the target text (the assistant's answer)."
    )
    prompt: str = Field(
        "Describe this image.",
        description="Instruction given with every image (unless prompt_column is set).",
    )
    prompt_column: str | None = Field(
        None, description="Column holding a per-row instruction; overrides prompt."
    )
    system_prompt: str | None = Field(None, description="Optional system turn.")
    id_column: str | None = Field(
        None,
        description="Column giving each row a stable identity (default: source file + row index).",
    )
    heldout_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of rows held out for evaluation, chosen by a hash of the row identity.",
    )
    image_min_size: int = Field(
        300, ge=1, description="Smallest long side after resizing, in px (upscaled to reach it)."
    )
    image_max_size: int = Field(1000, ge=1, description="Largest long side after resizing, in px.")
    max_image_pixels: int = Field(
        178_956_970,
        ge=1,
        description="Decompression-bomb limit (Pillow's MAX_IMAGE_PIXELS); never disabled.",
    )
    max_aspect_ratio: float | None = Field(
        None,
        gt=1.0,
        description="Reject images whose long/short side ratio exceeds this (default: the model family's limit).",
    )
    min_image_side: int = Field(
        8,
        ge=1,
        description="Reject source images with a side shorter than this, in px (a 1x1 image holds no content).",
    )
    image_format: Literal["png", "jpeg"] = Field(
        "png", description="How images are stored in the prepared shards."
    )
    rows_per_shard: int = Field(
        500,
        ge=1,
        description="Rows per prepared shard: one Ray task each, held in its memory (500 rows of 1000 px PNGs is about 0.5 GB).",
    )
    dedup: bool = Field(
        False,
        description="Drop rows whose image + text content hash was already seen in the same input shard.",
    )
    max_rows: int | None = Field(
        None, ge=1, description="Read at most this many rows (smoke runs)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> DataSpec:
        if self.image_min_size > self.image_max_size:
            raise ValueError(
                f"image_min_size ({self.image_min_size}) is larger than image_max_size ({self.image_max_size})"
            )
        return self


class TrainSpec(_Section):
    """Trainer knobs, under TRL SFTConfig / transformers TrainingArguments names."""

    engine: Literal["auto", "unsloth", "hf"] = Field(
        "auto",
        description="auto: Unsloth on a CUDA GPU, else transformers+PEFT on CPU. The log says which ran and why.",
    )
    train_on_responses_only: bool = Field(
        True, description="Mask everything but the assistant's answer in the labels."
    )
    per_device_train_batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0, description="Used when max_steps is not set.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimiser steps (overrides num_train_epochs)."
    )
    warmup_steps: int = Field(5, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    optim: str = Field(
        "adamw_torch", description='TrainingArguments optim, e.g. "adamw_8bit" on GPU.'
    )
    weight_decay: float = Field(0.01, ge=0)
    lr_scheduler_type: str = Field("linear")
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = Field(3407)
    bf16: bool | None = Field(
        None, description="bf16 mixed precision; default: where the GPU supports it."
    )
    fp16: bool | None = Field(
        None, description="fp16 mixed precision; default: on GPUs without bf16."
    )
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(
        50, ge=1, description="Checkpoint to <run>/checkpoints/ every N optimiser steps."
    )
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept in object storage.")
    dataloader_num_workers: int = Field(0, ge=0)
    tf32: bool | None = Field(
        None,
        description=(
            "TF32 for float32 matmuls (Ampere or newer GPUs): the float32 work around a bf16 "
            "model (LoRA weights kept in float32 over quantized layers, upcast logits) runs on "
            "tensor cores at slightly lower precision. Default: the library's choice. Measured "
            "no gain at 7B, batch 4, 4-bit on an H100 (docs/benchmarks.md)."
        ),
    )
    profile_steps: int = Field(
        0,
        ge=0,
        description=(
            "Run torch.profiler over this many optimiser steps (0: off) and write the top ops by "
            "GPU and CPU time and a summary (ms per step, GPU-busy share, kernel launches) to "
            "<run>/train/profile/. One step before them warms the profiler up and is left out, "
            "so the run needs this many + 1 steps from train.profile_start_step. The profiled "
            "steps run slower; the rest of the run does not."
        ),
    )
    profile_start_step: int = Field(
        5,
        ge=0,
        description=(
            "Optimiser steps before the profiled ones (compilation and warm-up); one more step "
            "then warms the profiler itself up, unrecorded."
        ),
    )
    pad_to_multiple_of: int | None = Field(
        None,
        ge=1,
        description=(
            "Pad every batch to a multiple of this many tokens (e.g. 64): a few fixed lengths "
            "instead of one per batch, so a compiled model (Unsloth) stops recompiling on new lengths."
        ),
    )
    label_span_logits: bool = Field(
        True,
        description=(
            "Compute the output head and the loss only from each batch's first labelled "
            "position to its end (transformers' logits_to_keep), cut in the data loader. With "
            "train_on_responses_only the image and prompt tokens come first and carry no "
            "labels: at 7B, 448 px, ~90% of a caption sample's positions. The loss is the same "
            "sum over the same tokens (a CPU test compares losses and gradients). Both engines; "
            "skipped with a warning for a model whose forward takes no logits_to_keep. On by "
            "default: 1.03x samples/s at 7B, batch 32, float8 base layers on an H100 "
            "(docs/benchmarks.md, run 25); false computes the head over every position."
        ),
    )
    group_by_length: bool = Field(
        False,
        description=(
            "Form each step's batch from rows of similar length (image pixels and text), in an "
            "order shuffled per epoch from train.seed: far less padding when image sizes vary. "
            "A resumed run sees the same order."
        ),
    )
    checkpoint_every_n_layers: int = Field(
        1,
        ge=1,
        description=(
            "With model.use_gradient_checkpointing on, checkpoint only every n-th layer "
            "(transformers' every_n_layers): the other layers keep their activations, so less "
            "is recomputed in backward for more memory. 1 = every layer. At 7B on an H200, 2 "
            "was no faster than 1 (docs/benchmarks.md run 7); checkpoint_scope: vision was."
        ),
    )
    checkpoint_scope: Literal["all", "vision", "language"] = Field(
        "all",
        description=(
            "With model.use_gradient_checkpointing on, which layers are checkpointed: all, only "
            "the vision tower's blocks, or only the language model's layers (the others keep "
            "their activations). 'vision' was the fastest measured setting at 7B on an H200 "
            "(9.23 samples/s at batch 4 and 13.92 GiB; 33.38 at batch 32 in 56.4 GiB): "
            "recomputing the language model's layers is what costs (docs/benchmarks.md)."
        ),
    )
    fused_lora_mlp: bool = Field(
        True,
        description=(
            "Unsloth engine: run the language model's LoRA MLPs through Unsloth's fused SwiGLU "
            "autograd function (as Unsloth does for language models; FastVisionModel does not), "
            "which keeps two of the MLP's wide intermediates per token instead of three and "
            "issues fewer kernels. Same maths; MLPs with bias or LoRA dropout are left on PEFT's layers. "
            "7B, batch 4, vision tower checkpointed (H200): 11.93 samples/s at 12.60 GiB vs "
            "11.53 at 13.92 without (docs/benchmarks.md run 11)."
        ),
    )
    recompute_mlp: bool = Field(
        False,
        description=(
            "With train.fused_lora_mlp: keep only each language MLP's input for the backward "
            "and recompute its gate and up projections there (two GEMMs per layer) instead of "
            "keeping both. 7B, batch 4, 448 px, vision tower checkpointed (H200): peak 10.23 "
            "GiB vs 12.60, 9.45-10.01 samples/s vs 9.39 (runs 12-13); unmeasured at large batch, "
            "where the two extra GEMMs per layer are not hidden by host time."
        ),
    )
    compile_vision: bool = Field(
        False,
        description=(
            "Unsloth engine: torch.compile each vision block, its LoRA layers and attention "
            "included, so that its forward, its recomputation under checkpointing and its "
            "backward each run as one compiled graph instead of dozens of Python-dispatched "
            "ops. At batch 4 the step is bound by host time, most of it in the vision tower "
            "(GPU busy 21% of the step at 7B, docs/benchmarks.md run 9). Measured slower, so "
            "off by default: 7B, batch 4, H200 (run 14) 5.26 and 5.89 samples/s with it against "
            "7.95 without (2,595 device-to-host copies per step, first step 69 s)."
        ),
    )
    lora_add_without_copy: bool = Field(
        True,
        description=(
            "Unsloth engine: add each LoRA adapter's product to its base layer's output without "
            "Unsloth's out-of-place addmm, which first copies the whole output (one "
            "device-to-device copy per LoRA layer and call; 7B, batch 32, 448 px on an H100: "
            "523 per step, 51 ms of ~1,000, docs/benchmarks.md run 25). In eager code the sum "
            "is made in place (addmm_); in code torch.compile traces, as a matmul and an add "
            "that Inductor fuses into the next elementwise kernel, which reads the sum before "
            "it is rounded to bf16. Run 29 (same settings): 34.04 samples/s against 32.00 "
            "(1.064x; run 27, before a fix to its eager half: 1.04x); run 30: 71 copies per "
            "step left, 2.0 ms. In every comparison with "
            "float32 so far (runs 28, 29) it trains nearer it: "
            "less of LoRA's small early product is rounded away. So its loss differs from "
            "Unsloth's add's (run 27: 9.636 against 9.704); false gives Unsloth's add back."
        ),
    )
    cuda_graphs: bool = Field(
        False,
        description=(
            "Unsloth engine, CUDA only; experimental. Replay each language decoder layer's "
            "forward and backward as CUDA graphs (captured on the first step with each batch "
            "shape), so one launch replaces its Python-dispatched kernels: the batch-4 step is "
            "bound by host time. 7B, batch 4, padded to 64 (H200, docs/benchmarks.md run 19): "
            "10.04 samples/s at 11.13 GiB against 7.66 at 10.25 without, in one hold; with "
            "train.host_input_embedding too (run 20): 9.90 samples/s at 10.11 GiB against "
            "7.29 at 9.24 without graphs, and HF's 4.18-4.65 at 17.18. Layers under "
            "activation checkpointing are left eager "
            "(train.checkpoint_scope: vision keeps them out). Each padded length holds its own "
            "graphs in GPU memory: set train.pad_to_multiple_of."
        ),
    )
    host_input_embedding: bool = Field(
        False,
        description=(
            "Keep the frozen input embedding table in host memory and look its rows up in the "
            "data loader, where the batch is collated; the rows reach the GPU with the batch. "
            "Saves the table's GPU memory (1.02 GiB at the 7B shape) for 9.1 MB more per "
            "batch-4 step to copy, with no lookup or sync on the training loop (unlike "
            "model.offload_embedding) when train.dataloader_num_workers >= 1. Same numbers as "
            "without. Not for full fine-tuning; a "
            "table tied to lm_head stays where it is (a warning says so). Both engines. "
            "On an H200 (7B, batch 4, run 20) every step's rows came from the batch, and with "
            "train.cuda_graphs the peak fell from 11.13 to 10.11 GiB."
        ),
    )
    fp8: bool = Field(
        False,
        description=(
            "Run the GEMMs of LoRA's frozen base layers in float8 (forward and input gradient; "
            "e4m3 weights quantized once, per-tensor power-of-two scales; no weight gradient, "
            "the weights are frozen). Adapters, attention, norms and lm_head stay in bf16. For "
            "large batches, where the step is bound by the GPU's bf16 arithmetic (~58% of an "
            "H200's peak at 7B from batch 32 up, docs/benchmarks.md run 16). CUDA compute "
            "capability 8.9+ only; with a 16-bit model (not model.load_in_4bit/8bit) and LoRA. "
            "On the Unsloth engine the language MLPs then run through PEFT's layers "
            "(train.fused_lora_mlp's kernel reads bf16 weights). Numbers change slightly. "
            "With save.merged_16bit a bf16 copy of the base weights is kept in host memory for "
            "the merge. Only layers at least train.fp8_min_features wide. On an H200 (7B, "
            "batch 32, docs/benchmarks.md run 24): 1.165x the bf16 step, 5.7 GiB less peak, "
            "loss within 0.1%."
        ),
    )
    fp8_min_features: int = Field(
        2560,
        ge=16,
        description=(
            "With train.fp8: only base layers at least this wide run in float8; the others stay "
            "bf16. A layer's width here is the harmonic mean of its input and output widths, "
            "2*in*out/(in+out): float8 halves the GEMM's in*out work per token but adds "
            "quantizing in + out values, so a narrow layer loses. At 7B, batch 32, on an H200 "
            "(docs/benchmarks.md run 21) float8 took the language q/o and MLP GEMMs (widths "
            "3584 and 6028) from 1.7-6.0 ms to 0.8-3.2 ms, but k/v (3584x512, width 896) from "
            "0.25 to 0.95 ms, and the vision tower's layers (widths 1280-2048) were 2% slower in "
            "all. 2560 keeps exactly the ones that gained: at 7B, 140 of 324 layers, 1.165x "
            "the bf16 step in run 24 (every layer: 1.115x). 16 converts every aligned layer."
        ),
    )
    fp8_scaling: Literal["row", "tensor"] = Field(
        "row",
        description=(
            "With train.fp8: how activations and gradients are scaled to float8: 'row' one "
            "scale per token (robust to a few outlier tokens), 'tensor' one per tensor (a "
            "cheaper GEMM kernel; outliers cost the other values precision). The frozen "
            "weights have one scale per tensor either way."
        ),
    )
    loss_chunks: int | None = Field(
        None,
        ge=1,
        description=(
            "Unsloth engine: row chunks of the fused cross-entropy (UNSLOTH_CE_LOSS_N_CHUNKS). "
            "Default: Unsloth's choice from free memory, which is one chunk when there is room: "
            "the logits of the whole batch at once (0.36 GiB at 7B, batch 4, 448 px). 4 "
            "chunks there: 0.47 GiB lower peak, 8% slower (docs/benchmarks.md run 12)."
        ),
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="Ray actor restarts; a restarted actor resumes from the last checkpoint.",
    )

    @model_validator(mode="after")
    def _precision(self) -> TrainSpec:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 cannot both be true")
        return self


class SaveSpec(_Section):
    """What the train stage leaves under <run>/model/."""

    adapter: bool = Field(
        True, description="Save the LoRA adapter + processor under <run>/model/adapter/."
    )
    merged_16bit: bool = Field(
        False, description="Also save a merged 16-bit model under <run>/model/merged/."
    )


class GenerationSpec(_Section):
    """What model.generate receives at inference."""

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0)
    min_p: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    do_sample: bool = Field(False)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int = Field(0)
    batch_size: int = Field(8, ge=1, description="Images per generate call.")
    cache_implementation: Literal["static"] | None = Field(
        None,
        description=(
            'KV cache; "static" preallocates it, and on CUDA transformers then compiles the decoding '
            "step (CUDA graphs; each new batch shape compiles once, ~40 s). Default: the dynamic "
            "cache. On an H100 (2B shape) decoding went from 43 to 9 ms per step at batch 256 "
            "(docs/benchmarks.md)."
        ),
    )
    max_cache_len: int | None = Field(
        None,
        ge=1,
        description=(
            "With the static cache: preallocate it for this many tokens (the longest prompt, image "
            "tokens included, plus max_new_tokens), so that longer prompts later in a job reuse it "
            "instead of reallocating it and compiling again. Default: sized by the first batch, "
            "grown when a longer one comes."
        ),
    )

    @model_validator(mode="after")
    def _cache_len_needs_static_cache(self) -> GenerationSpec:
        if self.max_cache_len is not None and self.cache_implementation != "static":
            raise ValueError("max_cache_len applies to cache_implementation: static only")
        return self


class InferSpec(_Section):
    """Which images the infer stage reads and which model it uses."""

    source: str | None = Field(
        None,
        description="Images to caption (any data.source form); default: the prepared held-out split.",
    )
    job: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$",
        description=(
            "With infer.source: the bulk job's folder, <run>/bulk/<job>/ (its prepared input and "
            "its predictions), so that a trained run can caption any number of sources beside "
            "its held-out predictions. Default: named after the source, e.g. '2026-11-1a2b3c4d' "
            "for s3://bucket/scans/2026-11/ (its last path part and a hash of the whole), so "
            "the same source resumes the same job."
        ),
    )
    format: DataFormat = Field("auto")
    prompt: str | None = Field(
        None, description="Fixed prompt for arbitrary images (default: data.prompt)."
    )
    models: list[Literal["base", "finetuned"]] = Field(
        ["base", "finetuned"],
        description="Which models to run: the base model and/or the fine-tuned one.",
    )
    rows_per_shard: int = Field(
        1000, ge=1, description="Rows per input shard when reading an arbitrary image source."
    )
    engine: Literal["auto", "unsloth", "hf"] | None = Field(
        None,
        description=(
            "Inference engine; default: train.engine. On an H100 (2B shape) the transformers "
            "engine generated 1.13x faster than Unsloth's and loads without compiling "
            "(docs/benchmarks.md)."
        ),
    )
    compile_vision: bool = Field(
        False,
        description=(
            "torch.compile the vision tower's blocks (fuses its elementwise work; compiles once "
            "per process and input shape, ~10 s). On an H100 (2B shape) the vision tower went from "
            "1.39 to 0.84 s per 256 images (docs/benchmarks.md)."
        ),
    )
    compile_language: bool = Field(
        False,
        description=(
            "torch.compile the language model's MLPs and RMSNorms (fuses their elementwise work, "
            "and with fp8: all the float8 scaling of their inputs). On an H100 (2B, batch 512, "
            "bf16 language model, inference run 15) prefill went from 2.36 to 2.13 s per 512 "
            "images and peak memory from 24.9 to 22.4 GiB; the two-actor pool from 187.5 to "
            "201.9 images/s."
        ),
    )
    fp8: Literal["off", "vision", "all"] = Field(
        "off",
        description=(
            "Run linear layers as float8 GEMMs (torchao, per-row scales; CUDA compute capability "
            "8.9+, the transformers engine only): 'vision' the vision tower's blocks, 'all' every "
            "linear layer but the output head. Faster prefill; outputs close to bf16's, not equal "
            "(docs/benchmarks.md has speed and fidelity). 'vision' took a 2B pool from 121.7 to "
            "140.2 images/s at batch 512 on an H200; its first batch compiled in 37 s."
        ),
    )
    fp8_scaling: Literal["row", "tensor", "static"] = Field(
        "row",
        description=(
            "With infer.fp8: how activations are scaled to float8: 'row' one scale per token at "
            "run time (torchao PerRow, weights per output channel), 'tensor' one scale per "
            "tensor at run time (PerTensor, for weights too), 'static' one scale per layer "
            "calibrated once on the first infer.fp8_calibration_rows input rows and kept in "
            "predictions/<model>/fp8_input_scales.json, so every actor and every re-run uses the "
            "same (no pass over the activation to find its range: the cheapest scaling; values "
            "beyond the calibrated range saturate). Kernel timings at the 2B vision shape "
            "(docs/benchmarks.md, inference run 11): one block's linear layers 31.3 ms per-row, "
            "20.8 ms static per-tensor. In the pool (2B, bs 512, H200, with cuDNN vision "
            "attention) 'static' ran 160.5 images/s, 2.19x plain HF (run 12); 'tensor' is not "
            "yet measured there."
        ),
    )
    fp8_calibration_rows: int = Field(
        256,
        ge=1,
        description=(
            "With infer.fp8_scaling: static: how many input rows (the first ones of the first "
            "input shard) calibrate the float8 input scales. More rows see rarer large values."
        ),
    )
    vision_attention: Literal["auto", "cudnn"] = Field(
        "auto",
        description=(
            "SDPA backend of the vision tower's attention (CUDA, Qwen2-VL-style towers of "
            "same-size images): 'auto' lets torch choose (flash attention), 'cudnn' tries "
            "cuDNN's kernel first. The language model's attention is not affected (cuDNN stays "
            "off there: it rebuilds a graph per decode length). At head size 80, 512 images of "
            "1,024 patches, an H200 ran one attention call in 6.66 ms with cuDNN against 10.79 "
            "with flash (bench/vision_kernels.py, 2026-12-04)."
        ),
    )
    defer_stop_check: bool = Field(
        False,
        description=(
            "On CUDA, read generate's per-step 'have all rows finished?' flag one step late "
            "(transformers' DeferredStopCheck, which it turns on for Apple's MPS only), so the "
            "host queues the next decoding step while the current one runs instead of waiting "
            "for it. The tokens are the same (a GPU test checks it); when a stop is seen late, "
            "one extra step is run and undone. On an H100 (2B, batch 512, inference run 15) a "
            "decoding step went from 13.6 to 11.1 ms, within the noise of a whole batch's time."
        ),
    )
    actors_per_gpu: int = Field(
        1,
        ge=1,
        le=8,
        description=(
            "Inference actors (model copies) per GPU: each takes ray.num_gpus_per_worker / "
            "actors_per_gpu of a GPU, and the default pool grows to match. Two processes fill "
            "each other's host-side gaps (loading, preprocessing, writing, Python between "
            "kernels). Each copy holds its own weights and cache, so it needs the memory of "
            "one actor times this. On an H100 (2B, batch 512, inference run 15) 2 took the "
            "pool from 153.3 to 187.5 images/s; 3 at batch 384 reached 205.4 (with "
            "compile_language). The copies are time-sliced unless an NVIDIA MPS daemon runs "
            "on the node; each actor records which as gpu_sharing (docs/deploy.md)."
        ),
    )
    image_column: str | None = Field(
        None,
        description="Image column of infer.source (default: data.image_column; image folders need none).",
    )
    id_column: str | None = Field(
        None,
        description="Column giving infer.source rows a stable identity (default: source file + row index; data.id_column is not used).",
    )
    prompt_column: str | None = Field(
        None, description="Column of infer.source holding a per-row prompt."
    )
    text_column: str | None = Field(
        None,
        description="Column of infer.source holding references, if any (default: data.text_column).",
    )

    @field_validator("job")
    @classmethod
    def _job_needs_a_source(cls, job: str | None, info: ValidationInfo) -> str | None:
        # `source` is declared (so validated) before `job`: info.data holds it.
        if job is not None and info.data.get("source") is None:
            raise ValueError(
                "names a bulk job over infer.source; set infer.source too (without it, infer "
                "predicts the held-out split into <run>/predictions/)"
            )
        return job


class EvalSpec(_Section):
    """How predictions are scored."""

    strip: bool = Field(True, description="Strip leading/trailing whitespace before scoring.")
    collapse_whitespace: bool = Field(
        True, description="Collapse runs of whitespace into one space."
    )
    lowercase: bool = Field(False, description="Compare case-insensitively.")
    metric: Literal["cer", "wer", "exact_match", "bleu", "chrf"] = Field(
        "cer", description="Headline metric (used by promotion)."
    )
    examples_in_report: int = Field(8, ge=0, le=64)


class PromoteSpec(_Section):
    """The promotion gate of scheduled retraining."""

    root: str | None = Field(
        None,
        description="Where current.json and promotions/ live (default: the parent of run.uri).",
    )
    margin: float = Field(
        0.0,
        ge=0,
        description="The challenger must beat the champion by at least this much on eval.metric.",
    )


class RaySpec(_Section):
    """How work is spread over the Ray cluster."""

    address: str | None = Field(
        None,
        description='Ray address: None starts/joins a local cluster, "auto" joins a running one.',
    )
    num_cpus_per_task: float = Field(1.0, gt=0, description="CPUs per prepare task.")
    num_gpus_per_worker: float = Field(
        1.0,
        ge=0,
        description=(
            "GPUs per train actor, and per group of infer.actors_per_gpu inference actors, "
            "when GPUs exist."
        ),
    )
    num_cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per train/infer actor.")
    pool_size: int | None = Field(
        None,
        ge=1,
        description=(
            "Inference actors (default: as many as the cluster's GPUs hold at "
            "ray.num_gpus_per_worker / infer.actors_per_gpu each, or 1 on CPU)."
        ),
    )
    max_in_flight: int | None = Field(
        None, ge=1, description="Prepare tasks in flight at once (default: 2 x cluster CPUs)."
    )
    max_retries: int = Field(3, ge=0, description="Ray task retries when a worker dies.")


class JobSpec(_Section):
    """The whole job spec. Sections map to stages; see examples/*.yaml."""

    run: RunSpec = Field(default_factory=RunSpec)
    model: ModelSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    save: SaveSpec = Field(default_factory=SaveSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    infer: InferSpec = Field(default_factory=InferSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    promote: PromoteSpec = Field(default_factory=PromoteSpec)
    ray: RaySpec = Field(default_factory=RaySpec)

    @property
    def infer_actor_gpu_share(self) -> float:
        """The GPUs one inference actor asks for on a GPU cluster: ray.num_gpus_per_worker split
        between infer.actors_per_gpu model copies."""
        return self.ray.num_gpus_per_worker / self.infer.actors_per_gpu

    @model_validator(mode="after")
    def _cuda_graphs_need_uncheckpointed_language_layers(self) -> JobSpec:
        # A checkpoint reruns a layer's forward inside the backward, over a graph's saved
        # activations, so checkpointed layers stay eager: here that is every language layer.
        t, checkpointing = self.train, self.model.use_gradient_checkpointing
        if (
            t.cuda_graphs
            and checkpointing is not False
            and t.checkpoint_scope in ("all", "language")
            and t.checkpoint_every_n_layers == 1
        ):
            raise ValueError(
                "train.cuda_graphs: every language layer is under activation checkpointing "
                f"(model.use_gradient_checkpointing: {checkpointing}, train.checkpoint_scope: "
                f"{t.checkpoint_scope}), where layers stay eager; set train.checkpoint_scope: "
                "vision or model.use_gradient_checkpointing: false"
            )
        return self

    @model_validator(mode="after")
    def _host_input_embedding_needs_a_frozen_table(self) -> JobSpec:
        if not self.train.host_input_embedding:
            return self
        if self.model.full_finetuning:
            raise ValueError(
                "train.host_input_embedding: model.full_finetuning trains the input embedding, "
                "which then cannot stay in host memory; turn one of them off"
            )
        if self.model.offload_embedding is True:
            raise ValueError(
                "train.host_input_embedding and model.offload_embedding both move the input "
                "embedding to host memory; set model.offload_embedding: false (or leave it "
                'at "auto", which then stays off)'
            )
        return self

    @model_validator(mode="after")
    def _an_infer_actor_s_gpu_share_is_a_fraction_or_whole(self) -> JobSpec:
        # Ray accepts a fraction of one GPU or a whole number of GPUs, nothing in between.
        share = self.infer_actor_gpu_share
        if share > 1 and share != int(share):
            raise ValueError(
                f"infer.actors_per_gpu: {self.infer.actors_per_gpu} copies over "
                f"ray.num_gpus_per_worker: {self.ray.num_gpus_per_worker} GPUs leaves each "
                f"{share:g} GPUs; Ray takes a fraction of one GPU or a whole number of them"
            )
        return self

    @model_validator(mode="after")
    def _fp8_needs_a_16bit_lora_base(self) -> JobSpec:
        if not self.train.fp8:
            return self
        m = self.model
        if m.full_finetuning:
            raise ValueError(
                "train.fp8: model.full_finetuning trains the base weights, which train.fp8 "
                "keeps frozen in float8; turn one of them off"
            )
        quantized = [k for k in ("load_in_4bit", "load_in_8bit") if getattr(m, k)]
        if quantized:
            raise ValueError(
                f"train.fp8: model.{quantized[0]} already quantizes the base weights "
                "(bitsandbytes); train.fp8 needs them in 16 bits. Turn one of them off"
            )
        return self


class SpecError(ValueError):
    """A job spec that cannot be used; the message names every bad field."""


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid job spec {origin}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")  # our own validators' sentences
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `vlm-ray <stage> --help` lists the keys)"
        elif e["type"] == "missing":
            msg = "required, but not given"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML so `r=8`, `bf16=true`, `target_modules=[q_proj]` get their types."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides to a raw spec dict (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"override {item!r} is not of the form dotted.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise SpecError(f"override {key}: {p} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def parse_spec(raw: dict[str, Any], origin: str = "") -> JobSpec:
    """Validate a raw dict into a JobSpec, or raise SpecError naming each bad field."""
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err, origin)) from None


def load_spec(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> JobSpec:
    """Read a YAML job spec (or none), apply overrides, validate."""
    raw: dict[str, Any] = {}
    origin = "(from overrides)"
    if path is not None:
        origin = str(path)
        text = Path(path).read_text()
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise SpecError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise SpecError(
                f"{path}: a job spec is a mapping of sections (run, model, data, ...), got {type(loaded).__name__}"
            )
        raw = loaded
    raw = apply_overrides(raw, overrides or [])
    return parse_spec(raw, origin)


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """The spec as plain data (for manifests: every output records what made it)."""
    return spec.model_dump(mode="json")


def describe_keys(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf key: the `--help` table."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_keys(ann, key + "."))
            continue
        default = (
            "(required)"
            if field.is_required()
            else repr(field.get_default(call_default_factory=True))
        )
        rows.append((key, default, field.description or ""))
    return rows
