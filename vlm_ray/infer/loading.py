"""Which weights a model tag means, and loading them once for inference (Unsloth on GPU, transformers on CPU).

    "base"       -> spec.model.name
    "finetuned"  -> <run>/model/model_info.json: an adapter on its base model, or a merged/full model
    other tags   -> model_info.json of another run (model_runs[tag]), e.g. the champion in retraining

Every URI goes through vlm_ray.models.resolve, so hub ids, folders and s3:// folders all load
(object-storage folders are copied once per node).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlm_ray import layout
from vlm_ray.config import JobSpec
from vlm_ray.infer.deferred_stop import enable_deferred_stop_check
from vlm_ray.infer.fp8_calibration import Fp8Calibration, quantize_linears_static
from vlm_ray.models.batched_rope_index import enable_batched_rope_index
from vlm_ray.models.compiled_language import compile_language_modules
from vlm_ray.models.compiled_vision import compile_vision_blocks
from vlm_ray.models.fp8_linear import check_fp8_device, quantize_linears_to_fp8
from vlm_ray.models.gqa_decode_attention import enable_gqa_decode_attention
from vlm_ray.models.packed_vision_attention import (
    enable_packed_vision_attention,
    prefer_cudnn_vision_attention,
)
from vlm_ray.models.patch_embed_matmul import run_patch_embeddings_as_matmul
from vlm_ray.models.remote_code import check_remote_code
from vlm_ray.models.resolve import resolve_model_path
from vlm_ray.models.truncation import forget_truncation
from vlm_ray.operator_errors import MissingInputError
from vlm_ray.storage import open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """What one model tag loads: a model folder, plus an optional LoRA adapter on top of it."""

    tag: str
    model_uri: str  # hub id, folder, or s3:// folder that from_pretrained loads
    adapter_uri: str | None = None  # PEFT adapter folder (its processor travels with it)
    source: str = ""  # where this was decided (spec field or model_info.json URI), for logs

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (Ray arguments, manifests)."""
        return asdict(self)


def resolve_model_ref(
    spec: JobSpec, tag: str, model_runs: dict[str, str] | None = None
) -> ModelRef:
    """The weights behind a tag: "base" is model.name; any other tag reads a run's model/model_info.json."""
    if tag == "base":
        return ModelRef(tag, spec.model.name, None, "model.name")
    runs = model_runs or {}
    if tag != "finetuned" and tag not in runs:
        raise ValueError(
            f"model tag {tag!r}: expected 'base', 'finetuned', or a tag given in model_runs "
            f"(got model_runs for {sorted(runs) or 'no tags'})"
        )
    run_store = open_store(runs.get(tag, spec.run.uri), spec.run.s3_endpoint_url)
    info_uri = run_store.uri_of(layout.MODEL_INFO)
    if not run_store.exists(layout.MODEL_INFO):
        raise MissingInputError(
            f"model tag {tag!r}: {info_uri} does not exist; run the train stage on that run first, "
            "or leave the tag out of infer.models"
        )
    info = run_store.read_json(layout.MODEL_INFO)
    kind, path = info.get("kind"), info.get("path")
    if kind not in ("adapter", "full") or not path:
        raise ValueError(
            f"{info_uri}: expected kind 'adapter' or 'full' and a path, got kind={kind!r} path={path!r}"
        )
    if kind == "adapter":
        return ModelRef(tag, info["base_model"], run_store.uri_of(path), info_uri)
    return ModelRef(tag, run_store.uri_of(path), None, info_uri)


def _has_processor(folder: str) -> bool:
    p = Path(folder)
    return p.is_dir() and any(
        (p / name).exists() for name in ("preprocessor_config.json", "processor_config.json")
    )


def _left_padded(processor: Any) -> Any:
    # Decoder-only generation continues from the last position: pads must be on the left.
    processor.tokenizer.padding_side = "left"
    if getattr(processor, "padding_side", None) is not None:
        processor.padding_side = "left"
    # A prompt is never truncated (that would cut its image tokens): no saved default either.
    forget_truncation(processor)
    return processor


def prefer_fast_attention_kernels() -> None:
    """On CUDA, keep SDPA off its cuDNN backend for generation (see docs/benchmarks.md)."""
    import torch

    if torch.cuda.is_available():
        # Profiled on an H100: cuDNN attention spent ~0.4 ms of CPU per call building a graph
        # for every new decode length (28 calls per token), which bounded decoding; the flash /
        # memory-efficient kernels need no such set-up.
        torch.backends.cuda.enable_cudnn_sdp(False)


def load_for_inference(
    spec: JobSpec, ref: ModelRef, calibration: Fp8Calibration | None = None
) -> tuple[Any, Any, str]:
    """(model in eval mode on its device, left-padding processor, note naming the engine and why).

    calibration: where infer.fp8_scaling: static keeps its scales and which rows make them
    (the infer stage's pool gives it; needed only with that setting).
    """
    from vlm_ray.train.engine import choose_engine

    prefer_fast_attention_kernels()
    engine, why = choose_engine(spec, "infer")
    endpoint = spec.run.s3_endpoint_url
    model_path = resolve_model_path(ref.model_uri, endpoint)
    adapter_path = resolve_model_path(ref.adapter_uri, endpoint) if ref.adapter_uri else None
    processor_path = adapter_path if adapter_path and _has_processor(adapter_path) else model_path
    # Before from_pretrained: code shipped in the folder runs only with model.trust_remote_code=true.
    check_remote_code(ref.model_uri, model_path, spec.model.trust_remote_code)
    fp8 = spec.infer.fp8
    if fp8 != "off" and spec.infer.fp8_scaling == "static" and calibration is None:
        raise ValueError(
            "infer.fp8_scaling: static calibrates its scales on the input rows, which the infer "
            "stage provides (vlm-ray infer); here none were given. Use 'row' or 'tensor'."
        )
    if fp8 != "off":
        # These checks before minutes of loading: the answer does not depend on the weights.
        if engine != "hf":
            raise ValueError(
                f"infer.fp8: {fp8!r} runs on the transformers engine only (Unsloth's kernels "
                f"read the weights directly); this job resolved to {engine} ({why}). "
                "Set infer.engine: hf, or infer.fp8: off."
            )
        check_fp8_device(fp8)
    if engine == "unsloth":
        model, processor = _load_unsloth(spec, model_path, adapter_path)
    else:
        model, processor = _load_hf(spec, model_path, adapter_path, processor_path)
    if enable_packed_vision_attention(model):
        why += "; vision attention batched per layer"
        if spec.infer.vision_attention == "cudnn" and prefer_cudnn_vision_attention(model):
            why += " (cuDNN first)"
    elif spec.infer.vision_attention == "cudnn":
        log.warning(
            "infer.vision_attention=cudnn: this model's vision tower does not use the batched "
            "SDPA path (Qwen2-VL-style towers on SDPA only); its attention is left as it is"
        )
    if run_patch_embeddings_as_matmul(model):
        why += "; patch embedding as a matmul"
    if enable_gqa_decode_attention(model):
        why += "; decoding attention per KV head"
    if enable_batched_rope_index(model):
        why += "; rope position ids per batch"
    processor = _left_padded(processor)
    # Before the vision blocks are compiled, so that compilation sees the float8 layers.
    why += float8_layers(model, processor, spec, calibration)
    if spec.infer.compile_vision and compile_vision_blocks(model):
        why += "; vision blocks compiled"
    if spec.infer.compile_language and compile_language_modules(model):
        why += "; language MLPs and norms compiled"
    if spec.infer.defer_stop_check:
        if model.device.type != "cuda":
            log.info("infer.defer_stop_check: not on CUDA, so nothing to defer; left off")
        elif enable_deferred_stop_check():
            why += "; stop check deferred a step"
    note = f"{engine} ({why}); model {ref.model_uri}" + (
        f" + adapter {ref.adapter_uri}" if ref.adapter_uri else ""
    )
    return model, processor, note


def float8_layers(
    model: Any, processor: Any, spec: JobSpec, calibration: Fp8Calibration | None
) -> str:
    """Convert infer.fp8's linear layers in place (with static scales: calibrated first, in
    bf16); the load note's words for it, '' when infer.fp8 is off or no layer qualifies."""
    fp8, scaling = spec.infer.fp8, spec.infer.fp8_scaling
    if fp8 == "off":
        return ""
    if scaling == "static":
        if calibration is None:  # load_for_inference refuses this before loading
            raise ValueError("infer.fp8_scaling: static needs its calibration")
        n = quantize_linears_static(model, processor, fp8, calibration, spec.generation.batch_size)
        return f"; float8 linear layers ({fp8}, static calibrated scales)" if n else ""
    n = quantize_linears_to_fp8(model, fp8, scaling)
    return f"; float8 linear layers ({fp8}, per-{scaling} scales)" if n else ""


def _load_unsloth(spec: JobSpec, model_path: str, adapter_path: str | None) -> tuple[Any, Any]:
    """FastVisionModel.from_pretrained (+ the adapter) + for_inference, as Unsloth's notebooks do."""
    import unsloth  # noqa: F401  (first: it patches transformers and peft)
    from unsloth import FastVisionModel

    m = spec.model
    model, processor = FastVisionModel.from_pretrained(
        model_path,
        max_seq_length=m.max_seq_length,
        load_in_4bit=m.load_in_4bit,
        load_in_8bit=m.load_in_8bit,
        load_in_16bit=m.load_in_16bit and not (m.load_in_4bit or m.load_in_8bit),
        full_finetuning=False,
        trust_remote_code=m.trust_remote_code,
        **({"attn_implementation": m.attn_implementation} if m.attn_implementation else {}),
    )
    if adapter_path:
        from peft import PeftModel

        # The base is loaded from our own resolved path, not the adapter's recorded
        # base_model_name_or_path (a folder on the training node).
        model = PeftModel.from_pretrained(model, adapter_path)
        if not (m.load_in_4bit or m.load_in_8bit):
            # 16-bit: merged once, so decoding runs the base model's kernels only (LoRA's two
            # extra matmuls per layer and token would be launched at every decode step).
            model = model.merge_and_unload()
    FastVisionModel.for_inference(model)
    return model, processor


def _load_hf(
    spec: JobSpec, model_path: str, adapter_path: str | None, processor_path: str
) -> tuple[Any, Any]:
    """AutoModelForImageTextToText (+ the adapter merged in) and AutoProcessor: the CPU engine."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    m = spec.model
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
    if adapter_path:
        from peft import PeftModel

        # Merged once at load time: generation then runs at the base model's speed.
        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    model = model.to("cuda" if cuda else "cpu").eval()
    processor = AutoProcessor.from_pretrained(processor_path, trust_remote_code=m.trust_remote_code)
    return model, processor
