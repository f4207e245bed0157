"""train.cuda_graphs (vlm_ray/models/graphed_decoder_layers.py) without a GPU: the spec field,
which layers are wrapped, that a wrapped layer runs its original forward off CUDA, and the pieces
the CUDA path is built from (the call key, when a call stays eager, the first-gradient guard).
Capture and replay are checked on the GPU in tests/test_graphed_decoder_layers_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm_ray.config import SpecError, parse_spec
from vlm_ray.models.graphed_decoder_layers import (
    GraphedLayerForward,
    describe_call,
    eager_reason,
    enable_graphed_decoder_layers,
    flat_layer_call,
    graphed_forwards,
    guard_first_gradient,
    language_decoder_layers,
    rebuild_call,
)

MINIMAL = {"model": {"name": "some/model"}, "data": {"source": "data.jsonl"}}


def _spec(model: dict, train: dict):
    return parse_spec({**MINIMAL, "model": {**MINIMAL["model"], **model}, "train": train})


def test_cuda_graphs_is_off_by_default_and_can_be_turned_on() -> None:
    assert parse_spec(MINIMAL).train.cuda_graphs is False
    spec = _spec(
        {"use_gradient_checkpointing": True}, {"cuda_graphs": True, "checkpoint_scope": "vision"}
    )
    assert spec.train.cuda_graphs is True


@pytest.mark.parametrize(
    ("model", "train"),
    [
        ({"use_gradient_checkpointing": False}, {}),
        ({"use_gradient_checkpointing": True}, {"checkpoint_scope": "vision"}),
        ({}, {"checkpoint_every_n_layers": 2}),
    ],
    ids=["no-checkpointing", "vision-checkpointed", "every-2nd-layer"],
)
def test_cuda_graphs_is_accepted_where_some_language_layer_is_not_checkpointed(
    model: dict, train: dict
) -> None:
    assert _spec(model, {"cuda_graphs": True, **train}).train.cuda_graphs


@pytest.mark.parametrize("scope", ["all", "language"])
def test_cuda_graphs_with_every_language_layer_checkpointed_is_refused_naming_the_fix(
    scope: str,
) -> None:
    with pytest.raises(SpecError) as err:
        _spec({}, {"cuda_graphs": True, "checkpoint_scope": scope})
    message = str(err.value)
    assert "train.cuda_graphs" in message and "train.checkpoint_scope: vision" in message


@pytest.fixture(scope="module")
def lora_model_random_b(tiny_qwen2_vl: Path, lora_model):
    """The tiny Qwen2-VL with PEFT LoRA on every linear layer, LoRA B drawn at random (it starts
    at zero, which would leave every A's gradient zero)."""
    model = lora_model(tiny_qwen2_vl)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[20, 21, 22, 23, 24, 25], [26, 27, 28, 29, 0, 0]])  # no special tokens
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**_batch(), use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_every_language_decoder_layer_is_wrapped_and_nothing_else(lora_model_random_b) -> None:
    text_layers = lora_model_random_b.config.get_text_config().num_hidden_layers
    layers = language_decoder_layers(lora_model_random_b)
    assert len(layers) == text_layers
    language = lora_model_random_b.base_model.model.model.language_model.layers
    assert all(a is b for a, b in zip(layers, language, strict=True))

    loss_before, grads_before = _loss_and_grads(lora_model_random_b)
    assert enable_graphed_decoder_layers(lora_model_random_b) == text_layers
    assert enable_graphed_decoder_layers(lora_model_random_b) == 0  # a second call wraps nothing
    wrapped = {
        name
        for name, m in lora_model_random_b.named_modules()
        if isinstance(m.forward, GraphedLayerForward)
    }
    assert len(wrapped) == text_layers
    assert not any(".visual." in name for name in wrapped)

    # Off CUDA every call runs the original forward: the same numbers, bit for bit.
    loss_after, grads_after = _loss_and_grads(lora_model_random_b)
    assert torch.equal(loss_before, loss_after)
    assert grads_before.keys() == grads_after.keys()
    assert any("language_model" in n and "lora_A" in n for n in grads_after)
    for name, g in grads_before.items():
        assert torch.equal(g, grads_after[name]), name
    assert [f.captured for f in graphed_forwards(lora_model_random_b)] == [0] * text_layers


def _call(hidden: torch.Tensor, mask: torch.Tensor | None = None, **kwargs):
    cos_sin = (torch.ones(2, 6, 16), torch.zeros(2, 6, 16))
    return (hidden,), {"attention_mask": mask, "position_embeddings": cos_sin, **kwargs}


def test_the_call_key_holds_shapes_dtypes_none_and_requires_grad_not_values() -> None:
    hidden = torch.randn(2, 6, 64, requires_grad=True)
    key, tensors = describe_call(*_call(hidden))
    assert tensors[0] is hidden and len(tensors) == 3  # hidden states, cos, sin

    assert describe_call(*_call(torch.randn(2, 6, 64, requires_grad=True)))[0] == key
    different = [
        _call(torch.randn(2, 7, 64, requires_grad=True)),  # another padded length
        _call(hidden.detach()),  # no grad into the layer
        _call(hidden.detach().to(torch.bfloat16).requires_grad_()),
        _call(hidden, mask=torch.zeros(2, 1, 6, 6, dtype=torch.bool)),  # a mask instead of None
        _call(hidden, use_cache=True),
        _call(hidden, use_cache=1),  # True and 1 are different constants
    ]
    keys = [describe_call(*c)[0] for c in different]
    assert len({key, *keys}) == 1 + len(keys)


def test_a_call_is_rebuilt_from_its_key_and_tensors() -> None:
    args, kwargs = _call(torch.randn(2, 6, 64), use_cache=False)
    key, tensors = describe_call(args, kwargs)
    new = [t + 1 for t in tensors]
    args2, kwargs2 = rebuild_call(key, new)
    assert args2[0] is new[0]
    assert kwargs2["attention_mask"] is None and kwargs2["use_cache"] is False
    assert isinstance(kwargs2["position_embeddings"], tuple)
    assert (
        kwargs2["position_embeddings"][0] is new[1] and kwargs2["position_embeddings"][1] is new[2]
    )


def test_a_real_layer_call_flattened_to_tensors_computes_the_same(lora_model_random_b) -> None:
    """What a graph captures: the layer's forward over its call's tensors, rebuilt from the key
    (the arguments transformers really passes a Qwen2-VL decoder layer)."""
    layer = language_decoder_layers(lora_model_random_b)[1]
    calls = []
    hook = layer.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        _loss_and_grads(lora_model_random_b)
    finally:
        hook.remove()
    args, kwargs = calls[0]
    key, tensors = describe_call(args, kwargs)
    assert kwargs["attention_mask"] is not None  # the batch is padded

    forward = getattr(layer.forward, "original", layer.forward)
    flat = flat_layer_call(layer, forward, key)
    assert {id(p) for p in flat.parameters()} == {id(p) for p in layer.parameters()}
    (out,) = flat(*tensors)
    assert torch.equal(out, forward(*args, **kwargs))
    assert flat.output_key[0] == "tensor"  # transformers 5 layers return the hidden states


def test_a_call_with_a_kv_cache_object_cannot_be_keyed() -> None:
    from transformers import DynamicCache

    assert describe_call(*_call(torch.randn(2, 6, 64), past_key_values=DynamicCache())) is None


def test_calls_that_stay_eager_say_why(lora_model_random_b) -> None:
    layer = language_decoder_layers(lora_model_random_b)[0]
    args, kwargs = _call(torch.randn(2, 6, 64, requires_grad=True))
    layer.train()
    assert eager_reason(layer, args, kwargs) == "not on CUDA"
    with torch.no_grad():
        assert eager_reason(layer, args, kwargs) == "grad disabled"
    assert eager_reason(layer, args, {**kwargs, "past_key_values": object()}) == "KV cache"
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert eager_reason(layer, args, kwargs).startswith("saved-tensor hooks")
    layer.gradient_checkpointing = True
    try:
        assert eager_reason(layer, args, kwargs) == "activation checkpointing"
    finally:
        layer.gradient_checkpointing = False
    layer.eval()
    try:
        assert eager_reason(layer, args, kwargs) == "eval mode"
    finally:
        layer.train()


def test_a_call_inside_a_backward_pass_stays_eager(lora_model_random_b) -> None:
    """A checkpoint recomputes its layers from inside the backward."""
    layer = language_decoder_layers(lora_model_random_b)[0]
    layer.train()
    args, kwargs = _call(torch.randn(2, 6, 64, requires_grad=True))
    seen = []

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            with torch.enable_grad():  # as a checkpoint recomputes
                seen.append(eager_reason(layer, args, kwargs))
            return grad

    Recompute.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert seen == ["inside a backward pass (a checkpoint's recomputation)"]


def test_first_gradient_guard_keeps_accumulation_right_over_a_reused_buffer() -> None:
    """What a graph's backward does: write into one static buffer and hand it to autograd."""
    static = torch.zeros(3)

    class ReusedBuffer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            return (x * weight).detach()

        @staticmethod
        def backward(ctx, grad):
            static.copy_(grad)
            return None, static.detach()

    def accumulate_two(weight):
        x = torch.ones(3)
        ReusedBuffer.apply(x, weight).sum().backward()
        (ReusedBuffer.apply(x, weight) * 2).sum().backward()
        return weight.grad

    unguarded = torch.nn.Parameter(torch.zeros(3))
    assert torch.equal(accumulate_two(unguarded), torch.full((3,), 4.0))  # 2 + 2: overwritten

    guarded = torch.nn.Parameter(torch.zeros(3))
    guard_first_gradient(guarded)
    assert torch.equal(accumulate_two(guarded), torch.full((3,), 3.0))  # 1 + 2
    assert guarded.grad.data_ptr() != static.data_ptr()
