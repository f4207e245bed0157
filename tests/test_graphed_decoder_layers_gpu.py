"""train.cuda_graphs on the GPU: the language decoder layers replay CUDA graphs and train as they
do eager. Two optimiser steps of two micro-batches each (two padded lengths, so two graphs per
layer, each replayed in the second step), graphed and eager from the same initial weights, give
the same losses and LoRA gradients up to bf16 rounding; the graphs were really captured. Plus:
a capture that fails leaves that call eager with one warning, and checkpointed layers stay eager.
Needs a CUDA GPU (and Unsloth for the engine test); skipped elsewhere (docs/gpu.md).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from vlm_ray.models.graphed_decoder_layers import enable_graphed_decoder_layers, graphed_forwards

pytestmark = pytest.mark.gpu

LOGGER = "vlm_ray.models.graphed_decoder_layers"


def _randomize_lora_b(model) -> None:
    """LoRA B starts at zero, which would leave every A's gradient zero."""
    import torch

    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator, device="cuda") * 0.05)


def _peft_model(tiny: Path, lora_model):
    import torch

    model = lora_model(tiny, torch.bfloat16).cuda()
    _randomize_lora_b(model)
    return model


def _text_micro_batches() -> list[dict]:
    """Two micro-batches of different lengths; the second is padded (a mask tensor, not None)."""
    import torch

    a = torch.arange(10, 34).view(4, 6)
    b = torch.arange(40, 76).view(4, 9)
    mask_b = torch.ones_like(b)
    mask_b[2:, 6:] = 0
    return [
        {"input_ids": a, "attention_mask": torch.ones_like(a), "labels": a},
        {"input_ids": b, "attention_mask": mask_b, "labels": b.masked_fill(mask_b == 0, -100)},
    ]


def _train(model, micro_batches: list[dict], steps: int = 2, **forward) -> tuple[list, list]:
    """Optimiser steps as the Trainer takes them (bf16 autocast with its weight cache on, gradient
    accumulation over the micro-batches); the losses and each step's LoRA gradients."""
    import torch

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-3)
    batches = [{k: v.to("cuda") for k, v in b.items()} for b in micro_batches]
    losses, grads = [], []
    model.train()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch, **forward).loss / len(batches)
            loss.backward()
            losses.append(loss.item())
        grads.append({n: p.grad.float().clone() for n, p in trainable if p.grad is not None})
        optimizer.step()
    return losses, grads


def _assert_same_training(eager: tuple[list, list], graphed: tuple[list, list]) -> None:
    losses_eager, grads_eager = eager
    losses_graphed, grads_graphed = graphed
    assert losses_graphed == pytest.approx(losses_eager, rel=1e-2)
    for step_eager, step_graphed in zip(grads_eager, grads_graphed, strict=True):
        assert step_eager.keys() == step_graphed.keys()
        language = [n for n in step_eager if "language_model" in n and "lora_" in n]
        assert language
        for name in language:
            g = step_eager[name]
            assert g.norm() > 0, name
            error = (step_graphed[name] - g).norm() / g.norm()
            assert error < 5e-2, (name, error.item())


def test_graphed_layers_train_like_eager_with_peft_lora(
    tiny_qwen2_vl: Path, lora_model, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    model = _peft_model(tiny_qwen2_vl, lora_model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batches = _text_micro_batches()
    eager = _train(model, batches, use_cache=False)

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in initial:
                p.copy_(initial[n])
    text_layers = model.config.get_text_config().num_hidden_layers
    assert enable_graphed_decoder_layers(model) == text_layers
    with caplog.at_level(logging.INFO, logger=LOGGER):
        graphed = _train(model, batches, use_cache=False)

    # two lengths: two graphs per layer, captured in step 1 and replayed in step 2
    assert [f.captured for f in graphed_forwards(model)] == [2] * text_layers
    assert caplog.text.count("captured for hidden states") == 2 * text_layers
    assert "capture failed" not in caplog.text
    _assert_same_training(eager, graphed)


def test_layers_under_activation_checkpointing_stay_eager(
    tiny_qwen2_vl: Path, lora_model, caplog: pytest.LogCaptureFixture
) -> None:
    model = _peft_model(tiny_qwen2_vl, lora_model)
    # non-reentrant: the loss needs no input that requires grad (text only, all layers checkpointed)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enable_graphed_decoder_layers(model)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        losses, _ = _train(model, _text_micro_batches(), steps=1, use_cache=False)

    assert all(loss > 0 for loss in losses)
    assert [f.captured for f in graphed_forwards(model)] == [0] * len(graphed_forwards(model))
    assert "under activation checkpointing and stay eager" in caplog.text


def test_a_layer_whose_capture_fails_runs_eager_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host sync (.item()) cannot be captured: that layer stays eager, the next one is graphed."""
    import torch

    class SyncingLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(16, 16)

        def forward(self, hidden_states):
            return self.linear(hidden_states) / (1 + hidden_states.abs().max().item())

    class PlainLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(16, 16)

        def forward(self, hidden_states):
            return torch.nn.functional.silu(self.linear(hidden_states)) + hidden_states

    torch.manual_seed(0)
    holder = torch.nn.Module()  # the layout language_decoder_layers looks for
    holder.language_model = torch.nn.Module()
    holder.language_model.layers = torch.nn.ModuleList([SyncingLayer(), PlainLayer()]).cuda()
    layers = holder.language_model.layers

    def step(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        layers.zero_grad(set_to_none=True)
        out = layers[1](layers[0](x))
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in layers.parameters()]

    x = torch.randn(4, 16, device="cuda", requires_grad=True)
    expected = step(x)
    assert enable_graphed_decoder_layers(holder) == 2
    stream = torch.cuda.current_stream()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        results = [step(x), step(x)]
    assert torch.cuda.current_stream() == stream  # the failed capture's side stream is not left

    for out, grads in results:
        assert torch.allclose(out, expected[0], atol=1e-5)
        for g, e in zip(grads, expected[1], strict=True):
            assert torch.allclose(g, e, atol=1e-5)
    assert [f.captured for f in graphed_forwards(holder)] == [0, 1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "capture failed" in warnings[0].getMessage()


def _collated(spec, model, processor, tiny: Path) -> list[dict]:
    """Two micro-batches of two image rows each, through the Unsloth collator; answers of
    different lengths, so the two have different padded lengths."""
    from PIL import Image, ImageDraw

    from vlm_ray.models.families import family_of
    from vlm_ray.train.unsloth_engine import build_unsloth_collator

    def row(i: int, answer: str) -> dict:
        img = Image.new("RGB", (56, 56), "white")
        ImageDraw.Draw(img).text((8, 20), str(i), fill="black")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        user = [{"type": "text", "text": "Read the number."}, {"type": "image"}]
        return {
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            "images": [Image.open(io.BytesIO(buf.getvalue()))],
        }

    collator = build_unsloth_collator(spec, model, processor, family_of(tiny))
    short = collator([row(1, "12"), row(2, "345")])
    long = collator([row(3, "6789 6789 6789"), row(4, "1011")])
    assert short["input_ids"].shape[1] != long["input_ids"].shape[1]
    return [short, long]


def test_unsloth_engine_with_cuda_graphs_trains_like_eager(
    tiny_qwen2_vl: Path, tiny_train_spec: Callable, tmp_path: Path
) -> None:
    """Through load_unsloth_model with train.cuda_graphs in the benchmark's setting (4-bit, the
    fused LoRA MLP keeping only its input, the vision tower checkpointed as
    train.checkpoint_scope: vision leaves it when training begins, LoRA's add without a copy as
    the engine sets it by default), against the same spec without it."""
    from vlm_ray.models.lora_add_without_copy import set_lora_add_without_copy
    from vlm_ray.train.activation_checkpointing import checkpointed_layers, limit_checkpointing
    from vlm_ray.train.unsloth_engine import load_unsloth_model

    def load(cuda_graphs: bool):
        spec = tiny_train_spec(
            tiny_qwen2_vl,
            tmp_path / "run",
            model={"use_gradient_checkpointing": True, "load_in_4bit": True},
            train={
                "engine": "unsloth",
                "cuda_graphs": cuda_graphs,
                "checkpoint_scope": "vision",
                "recompute_mlp": True,
            },
        )
        model, processor = load_unsloth_model(spec, str(tiny_qwen2_vl))
        # as train_unsloth does after loading (process-wide; undone below)
        assert spec.train.lora_add_without_copy  # the default since training run 28
        assert set_lora_add_without_copy(True) is not None  # Unsloth's PEFT forwards, switched
        model.gradient_checkpointing_enable()  # what the Trainer does when training begins
        limit_checkpointing(model, "vision")
        assert checkpointed_layers(model)[0] > 0  # the vision blocks
        _randomize_lora_b(model)
        return spec, model, processor

    try:
        spec, model, processor = load(cuda_graphs=False)
        batches = _collated(spec, model, processor, tiny_qwen2_vl)
        assert graphed_forwards(model) == []
        eager = _train(model, batches)
        del model

        _, model, _ = load(cuda_graphs=True)
        forwards = graphed_forwards(model)
        assert len(forwards) == model.config.get_text_config().num_hidden_layers
        graphed = _train(model, batches)
    finally:
        set_lora_add_without_copy(False)  # Unsloth's own add back, for the tests after this one

    assert [f.captured for f in forwards] == [2] * len(forwards)
    _assert_same_training(eager, graphed)
