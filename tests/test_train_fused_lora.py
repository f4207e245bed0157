"""train.fused_lora: a LoRA layer run as one autograd function computes what PEFT's modules
compute (outputs and the gradients of the input and of both LoRA matrices), on toy layers and
through the tiny Qwen2-VL's vision tower and language model; anything but plain LoRA runs
PEFT's own forward. (The 4-bit case, where the base weight is dequantised, needs a GPU:
tests/test_unsloth_gpu.py.)"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_collator import _rows

from vlm_ray.config import parse_spec
from vlm_ray.models.families import family_of
from vlm_ray.train.collator import VisionSFTCollator
from vlm_ray.train.fused_lora import LoraLinearFunction, fuse_lora_layers
from vlm_ray.train.hf_engine import load_hf_model


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)  # with a bias, as Qwen2's q/k/v projections
        self.down = torch.nn.Linear(32, 8, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _toy_pair(**lora) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    # init_lora_weights=False: lora_B random, not zero, so the LoRA branch counts in every check
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    for key, value in lora.items():
        setattr(config, key, value)
    peft_model = get_peft_model(_Toy(), config)
    fused = copy.deepcopy(peft_model)
    assert fuse_lora_layers(fused) == 2
    return peft_model, fused


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), x.grad, _grads(model)


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 16)], ids=["batch x seq x dim", "tokens x dim"])
def test_a_fused_layer_gives_peft_outputs_and_gradients(shape):
    peft_model, fused = _toy_pair()
    x = torch.randn(*shape)
    want_out, want_dx, want_grads = _run(peft_model, x)
    got_out, got_dx, got_grads = _run(fused, x)
    torch.testing.assert_close(got_out, want_out)
    torch.testing.assert_close(got_dx, want_dx)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == 4  # A and B of both layers
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], msg=name)


def test_a_fused_layer_is_one_autograd_node_instead_of_peft_s_chain():
    peft_model, fused = _toy_pair()
    x = torch.randn(2, 16, requires_grad=True)
    assert type(fused.base_model.model.up(x).grad_fn).__name__ == "LoraLinearFunctionBackward"
    assert type(peft_model.base_model.model.up(x).grad_fn).__name__ != (
        "LoraLinearFunctionBackward"
    )


def test_under_bf16_autocast_it_computes_in_bf16_and_keeps_float32_lora_gradients():
    peft_model, fused = _toy_pair()
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_out, _, want_grads = _run(peft_model, x)
        got_out, _, got_grads = _run(fused, x)
    assert got_out.dtype == torch.bfloat16
    torch.testing.assert_close(got_out.float(), want_out.float(), rtol=0.03, atol=0.03)
    for name, grad in got_grads.items():
        assert grad.dtype == torch.float32, name
        want = want_grads[name]
        assert torch.nn.functional.cosine_similarity(grad.flatten(), want.flatten(), dim=0) > 0.999


def test_dropout_disabled_or_merged_adapters_run_peft_s_own_forward():
    peft_model, fused = _toy_pair(lora_dropout=0.5)
    x = torch.randn(4, 16, requires_grad=True)
    assert type(fused.base_model.model.up(x).grad_fn).__name__ != "LoraLinearFunctionBackward"

    peft_model, fused = _toy_pair()
    with fused.disable_adapter(), peft_model.disable_adapter():
        torch.testing.assert_close(fused(x), peft_model(x))
    fused.base_model.model.up.merge()
    peft_model.base_model.model.up.merge()
    torch.testing.assert_close(fused(x), peft_model(x))


def test_fusing_keeps_the_state_dict_the_class_path_and_a_copy_stays_fused():
    peft_model, fused = _toy_pair()
    assert fused.state_dict().keys() == peft_model.state_dict().keys()
    theirs, ours = type(peft_model.base_model.model.up), type(fused.base_model.model.up)
    assert ours is not theirs and issubclass(ours, theirs)
    assert (ours.__module__, ours.__qualname__) == (theirs.__module__, theirs.__qualname__)
    copied = copy.deepcopy(fused)
    x = torch.randn(2, 16, requires_grad=True)
    assert type(copied.base_model.model.up(x).grad_fn).__name__ == "LoraLinearFunctionBackward"
    assert fuse_lora_layers(copied) == 2, "fusing again changes nothing"


def test_the_tiny_qwen2_vl_gives_the_same_loss_and_gradients_fused(
    tiny_qwen2_vl: Path, monkeypatch
):
    def load(fused: bool):
        spec = parse_spec(
            {
                "model": {"name": str(tiny_qwen2_vl)},
                "data": {"source": "unused"},
                "train": {"engine": "hf", "fused_lora": fused},
            }
        )
        model, processor, _ = load_hf_model(spec, str(tiny_qwen2_vl), family_of(tiny_qwen2_vl))
        return model.float().train(), processor

    peft_model, processor = load(False)
    with torch.no_grad():  # PEFT starts lora_B at zero; random values make the check real
        generator = torch.Generator().manual_seed(0)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=generator)
    fused, _ = load(True)
    fused.load_state_dict(peft_model.state_dict())
    batch = VisionSFTCollator(
        processor, family_of(tiny_qwen2_vl), train_on_responses_only=True, max_seq_length=512
    )(_rows())
    calls = []
    apply = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    losses, grads = [], []
    for model in (peft_model, fused):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(_grads(model))
    torch.testing.assert_close(losses[1], losses[0])
    adapted = [n for n in grads[0] if "lora_A" in n]
    assert any(".visual." in n for n in adapted), "vision layers (2-D activations) are fused too"
    fused_layers = [m for m in fused.modules() if getattr(type(m), "_fused_lora", False)]
    assert len(fused_layers) == len(adapted)
    assert len(calls) == len(adapted), (
        "every adapted layer ran fused, once, in the fused model only"
    )
    assert grads[1].keys() == grads[0].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_function_alone_is_a_lora_linear_with_exact_gradients():
    base = torch.nn.Linear(6, 3).double().requires_grad_(False)
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(
        LoraLinearFunction.apply(x, base, a, b, 0.5), base(x) + 0.5 * (x @ a.t()) @ b.t()
    )
    assert torch.autograd.gradcheck(
        lambda x, a, b: LoraLinearFunction.apply(x, base, a, b, 0.5), (x, a, b)
    )


def test_training_fused_learns_the_same_adapter(
    tiny_qwen2_vl: Path, write_prepared, tiny_train_spec, tmp_path: Path
):
    from safetensors.torch import load_file

    from vlm_ray import layout
    from vlm_ray.storage import LocalStore
    from vlm_ray.train.hf_engine import train_hf

    adapters = []
    for fused in (False, True):
        store = LocalStore(tmp_path / f"run-{fused}")
        write_prepared(store, rows=4)
        train = {"max_steps": 2, "warmup_steps": 0, "learning_rate": 5e-2, "fused_lora": fused}
        spec = tiny_train_spec(tiny_qwen2_vl, store.uri, train=train)
        out = train_hf(spec, store, tmp_path / f"work-{fused}", None, [])
        assert out["global_step"] == 2
        adapters.append(load_file(store.local_path(layout.ADAPTER) / "adapter_model.safetensors"))
    plain, fused = adapters
    assert plain.keys() == fused.keys() and plain
    moved = [k for k in plain if "lora_B" in k and plain[k].abs().max() > 0]
    assert moved, "two steps of big learning rate moved lora_B off its zero start"
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-3, atol=1e-4, msg=key)
