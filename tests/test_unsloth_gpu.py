"""The Unsloth GPU path: collator equivalence with the CPU collator, end-to-end training through
the train stage, 4-bit QLoRA and full fine-tuning. Every test needs a CUDA GPU and Unsloth; they are
skipped elsewhere and run on the GPU machine (docs/gpu.md says how)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

PROMPT = "Read the number in this image."


def _digit_image(i: int, width: int = 84, height: int = 56) -> bytes:
    """A real PNG: a number drawn on white, at a patch-snapped size (multiples of 28) as prepare leaves it."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(img).text((8, 20), str(100 + 7 * i), fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _messages(answer: str | None) -> list[dict]:
    user = {"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image"}]}
    if answer is None:
        return [user]
    return [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def _write_prepared(store, rows: int) -> None:
    """Prepared shards exactly as the architecture contract describes them (docs/architecture.md)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_ray import layout

    for split, n, offset in (("train", rows, 0), ("heldout", 2, rows)):
        recs = []
        for i in range(offset, offset + n):
            w, h = (84, 56) if i % 2 else (56, 56)
            answer = f"{100 + 7 * i}"
            recs.append(
                {
                    "id": f"row-{i}",
                    "source_id": str(i),
                    "image": _digit_image(i, w, h),
                    "width": w,
                    "height": h,
                    "prompt": PROMPT,
                    "system_prompt": None,
                    "text": answer,
                    "messages": json.dumps(_messages(answer)),
                }
            )
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(recs), buf)
        store.write_bytes(layout.prepared_shard(split, 0), buf.getvalue())
    store.write_json(
        layout.PREPARED_MANIFEST,
        {
            "rows_in": rows + 2,
            "rows_ok": rows + 2,
            "rows_quarantined": 0,
            "splits": {"train": rows, "heldout": 2},
            "shards": [
                {"split": "train", "key": layout.prepared_shard("train", 0), "rows": rows},
                {"split": "heldout", "key": layout.prepared_shard("heldout", 0), "rows": 2},
            ],
        },
    )


def _spec(model_dir: Path, run_uri: str, **train_overrides):
    from vlm_ray.config import parse_spec

    raw = {
        "run": {"uri": run_uri},
        "model": {"name": str(model_dir), "max_seq_length": 512},
        "data": {"source": "unused-in-these-tests", "image_min_size": 56, "image_max_size": 448},
        "train": {
            "engine": "unsloth",
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_steps": 4,
            "save_steps": 2,
            "warmup_steps": 0,
            "learning_rate": 1e-3,
            **train_overrides,
        },
    }
    return raw, parse_spec(raw)


def _examples(n: int = 4) -> list[dict]:
    """The collator's input rows: chat messages plus the image bytes, as the data loader gives them."""
    from PIL import Image

    return [
        {
            "messages": _messages(f"{100 + 7 * i}" * (1 + i % 3)),
            "images": [Image.open(io.BytesIO(_digit_image(i, 84 if i % 2 else 56, 56)))],
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("responses_only", [True, False], ids=["responses-only", "all-tokens"])
def test_cpu_collator_and_unsloth_collator_build_the_same_batch(
    tiny_qwen2_vl: Path, responses_only: bool
) -> None:
    import copy

    import torch
    from transformers import AutoProcessor

    from vlm_ray.models.families import family_of
    from vlm_ray.train.collator import VisionSFTCollator
    from vlm_ray.train.unsloth_engine import build_unsloth_collator, load_unsloth_model

    _, spec = _spec(tiny_qwen2_vl, "unused", train_on_responses_only=responses_only)
    family = family_of(tiny_qwen2_vl)
    model, unsloth_processor = load_unsloth_model(spec, str(tiny_qwen2_vl))
    theirs = build_unsloth_collator(spec, model, unsloth_processor, family)
    # the CPU path loads its processor with plain transformers, as hf_engine does
    ours = VisionSFTCollator(
        AutoProcessor.from_pretrained(tiny_qwen2_vl),
        family,
        train_on_responses_only=responses_only,
        max_seq_length=spec.model.max_seq_length,
    )
    rows = _examples(4)
    a = ours(copy.deepcopy(rows))
    b = theirs(copy.deepcopy(rows))

    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["attention_mask"], b["attention_mask"])
    assert a["pixel_values"].shape == b["pixel_values"].shape
    assert torch.equal(a["image_grid_thw"], b["image_grid_thw"])
    assert torch.equal(a["labels"], b["labels"])
    trained = (a["labels"] != -100).sum().item()
    answer_and_end = (a["attention_mask"] == 1).sum().item()
    assert 0 < trained < answer_and_end  # something is learnt, and prompt/image/padding are not


def test_unsloth_train_stage_saves_an_adapter_that_loads_with_unsloth_and_with_peft(
    tiny_qwen2_vl: Path, ray_cluster: None, tmp_path: Path
) -> None:
    import torch

    from vlm_ray import layout
    from vlm_ray.stages.train import run_train
    from vlm_ray.storage import LocalStore

    store = LocalStore(tmp_path / "run")
    _write_prepared(store, rows=8)
    _, spec = _spec(tiny_qwen2_vl, store.uri)
    spec.save.merged_16bit = True
    summary = run_train(spec)

    assert summary["engine"] == "unsloth"
    assert summary["global_step"] == 4
    assert store.exists(f"{layout.ADAPTER}/adapter_config.json")
    assert store.exists(f"{layout.ADAPTER}/adapter_model.safetensors")
    assert store.exists(f"{layout.MERGED}/config.json")
    adapter_dir = store.local_path(layout.ADAPTER)
    merged_dir = store.local_path(layout.MERGED)

    # Unsloth's own inference path from the adapter folder
    from PIL import Image
    from unsloth import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(str(adapter_dir), load_in_4bit=False)
    FastVisionModel.for_inference(model)
    image = Image.open(io.BytesIO(_digit_image(0)))
    text = processor.apply_chat_template(_messages(None), add_generation_prompt=True)
    batch = processor(text=[text], images=[[image]], return_tensors="pt").to(model.device)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]

    # plain transformers + peft, from the adapter and from the merged folder
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.bfloat16).cuda()
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    plain_proc = AutoProcessor.from_pretrained(adapter_dir)
    batch = plain_proc(text=[text], images=[[image]], return_tensors="pt").to("cuda")
    with torch.no_grad():
        out = peft_model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        logits_merged = merged(**batch).logits.float()
        logits_peft = peft_model(**batch).logits.float()
    # the merged model is the base plus the adapter: same outputs up to bf16 rounding
    assert torch.allclose(logits_merged, logits_peft, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    ("model_overrides", "train_overrides"),
    [
        ({"load_in_4bit": True}, {}),
        ({"full_finetuning": True}, {}),
        # an opt-in speed lever, on 4-bit layers
        ({"load_in_4bit": True}, {"group_by_length": True}),
    ],
    ids=["qlora-4bit", "full-finetuning", "qlora-4bit-length-grouped"],
)
def test_unsloth_engine_trains_4bit_qlora_and_full_finetuning(
    tiny_qwen2_vl: Path, tmp_path: Path, model_overrides: dict, train_overrides: dict
) -> None:
    from vlm_ray import layout
    from vlm_ray.config import parse_spec
    from vlm_ray.storage import LocalStore
    from vlm_ray.train.unsloth_engine import train_unsloth

    store = LocalStore(tmp_path / "run")
    _write_prepared(store, rows=8)
    raw, _ = _spec(tiny_qwen2_vl, store.uri, max_steps=3, **train_overrides)
    raw["model"].update(model_overrides)
    spec = parse_spec(raw)
    summary = train_unsloth(spec, store, tmp_path / "work", resume_from=None, callbacks=[])

    assert summary["global_step"] == 3
    assert summary["train_loss"] > 0
    if spec.model.full_finetuning:
        assert summary["kind"] == "full"
        assert store.exists(f"{layout.MERGED}/config.json")
        assert not store.exists(f"{layout.ADAPTER}/adapter_config.json")
        assert "lora_add_without_copy" not in summary  # no LoRA layers to add to
    else:
        assert summary["kind"] == "adapter"
        # on by default, and on for this run: Unsloth had patched PEFT's LoRA forwards and the
        # engine swapped their add (the counts are of eager calls only, so they may be zero)
        assert "lora_add_without_copy" in summary, summary
        cfg = store.read_json(f"{layout.ADAPTER}/adapter_config.json")
        assert cfg["r"] == spec.lora.r


def _four_bit_model_and_batch(tiny: Path, use_gradient_checkpointing: bool | None = None, **train):
    """The tiny model through the Unsloth engine in 4-bit, one collated batch of 4 on the GPU,
    and LoRA B drawn at random (it starts at zero, which would leave every A's gradient zero)."""
    import torch

    from vlm_ray.config import parse_spec
    from vlm_ray.models.families import family_of
    from vlm_ray.train.unsloth_engine import build_unsloth_collator, load_unsloth_model

    raw, _ = _spec(tiny, "unused", **train)
    raw["model"]["load_in_4bit"] = True
    if use_gradient_checkpointing is not None:  # else the spec's default
        raw["model"]["use_gradient_checkpointing"] = use_gradient_checkpointing
    spec = parse_spec(raw)
    model, processor = load_unsloth_model(spec, str(tiny))
    collator = build_unsloth_collator(spec, model, processor, family_of(tiny))
    batch = {k: v.to("cuda") for k, v in collator(_examples(4)).items()}
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator, device="cuda") * 0.05)
    return model, batch


@pytest.mark.parametrize("recompute", [False, True], ids=["fused", "fused-recompute"])
def test_fused_lora_mlp_gives_peft_s_loss_and_gradients(
    tiny_qwen2_vl: Path, recompute: bool
) -> None:
    """train.fused_lora_mlp (Unsloth's LoRA SwiGLU in the language MLPs), and with
    train.recompute_mlp, change what autograd keeps, not what it computes: one 4-bit
    forward/backward with and without it."""
    from vlm_ray.models.fused_lora_mlp import enable_fused_lora_mlp

    model, batch = _four_bit_model_and_batch(tiny_qwen2_vl, fused_lora_mlp=False)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {
            n: p.grad.float().clone()
            for n, p in model.named_parameters()
            if p.grad is not None and ".mlp." in n and "language_model" in n
        }

    loss_peft, grads_peft = loss_and_grads()
    text_layers = model.config.get_text_config().num_hidden_layers
    assert enable_fused_lora_mlp(model, recompute=recompute) == text_layers
    loss_fused, grads_fused = loss_and_grads()

    assert loss_fused == pytest.approx(loss_peft, rel=1e-2)
    assert grads_peft.keys() == grads_fused.keys() and len(grads_peft) == 6 * text_layers
    for name, g in grads_peft.items():
        assert g.norm() > 0, name
        error = (grads_fused[name] - g).norm() / g.norm()
        assert error < 5e-2, (name, error.item())


def test_compiled_vision_blocks_give_eager_loss_and_gradients(tiny_qwen2_vl: Path) -> None:
    """train.compile_vision changes how the vision blocks are dispatched, not what they compute:
    one 4-bit forward/backward with the vision tower checkpointed (as train.checkpoint_scope:
    vision leaves it, so the compiled blocks also run inside the checkpoint's recomputation),
    eager and then compiled, twice (the second call runs the cached graphs)."""
    from vlm_ray.models.compiled_vision import compile_vision_blocks, vision_blocks
    from vlm_ray.train.activation_checkpointing import checkpointed_layers, limit_checkpointing

    model, batch = _four_bit_model_and_batch(
        tiny_qwen2_vl, compile_vision=False, use_gradient_checkpointing=True
    )
    model.gradient_checkpointing_enable()  # what the Trainer does when training begins
    limit_checkpointing(model, "vision")
    blocks = len(vision_blocks(model))
    assert checkpointed_layers(model)[0] == blocks > 0

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {
            n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None
        }

    loss_eager, grads_eager = loss_and_grads()
    assert compile_vision_blocks(model) == blocks
    for _ in range(2):
        loss_compiled, grads_compiled = loss_and_grads()
        assert loss_compiled == pytest.approx(loss_eager, rel=1e-2)
        assert grads_compiled.keys() == grads_eager.keys()
        vision = [n for n in grads_eager if "visual" in n and "lora_" in n]
        assert len(vision) >= 4 * blocks  # LoRA A and B on qkv/proj (and the MLP) of every block
        for name, g in grads_eager.items():
            assert g.norm() > 0, name
            error = (grads_compiled[name] - g).norm() / g.norm()
            assert error < 5e-2, (name, error.item())


def test_checkpointing_off_trains_the_same_steps_as_unsloth_s_and_checkpoints_no_layer(
    tiny_qwen2_vl: Path, tmp_path: Path
) -> None:
    """model.use_gradient_checkpointing: false reaches the Trainer too (TRL would checkpoint
    anyway), every_n_layers and checkpoint_scope pick the layers, and all of it only moves
    memory and time: the losses are the default's. (All four passed on an H200 in the eighth
    session, before training used the packed vision attention.)"""
    from vlm_ray.config import parse_spec
    from vlm_ray.storage import LocalStore
    from vlm_ray.train.activation_checkpointing import CheckpointingReport
    from vlm_ray.train.metrics_log import MetricsLog, read_metrics
    from vlm_ray.train.unsloth_engine import train_unsloth

    runs = {}
    setups = [
        ("unsloth", "unsloth", {}),
        ("off", False, {}),
        ("every-2nd", True, {"checkpoint_every_n_layers": 2}),
        ("vision-only", True, {"checkpoint_scope": "vision"}),
    ]
    for name, gc, train in setups:
        store = LocalStore(tmp_path / name)
        _write_prepared(store, rows=8)
        raw, spec = _spec(tiny_qwen2_vl, store.uri, max_steps=3, logging_steps=1, **train)
        raw["model"].update(load_in_4bit=True, use_gradient_checkpointing=gc)
        report = CheckpointingReport(spec.train.checkpoint_scope)
        train_unsloth(
            parse_spec(raw), store, tmp_path / f"work-{name}", None, [MetricsLog(store), report]
        )
        runs[name] = (report.layers, [r["loss"] for r in read_metrics(store) if "loss" in r])

    (done_off, total), losses_off = runs["off"]
    assert total > 2 and done_off == 0
    assert runs["every-2nd"][0] == ((total + 1) // 2, total)
    assert runs["unsloth"][0][0] > 0
    vision_depth = json.loads((tiny_qwen2_vl / "config.json").read_text())["vision_config"]["depth"]
    assert runs["vision-only"][0] == (vision_depth, total)
    assert len(losses_off) == 3
    for name in ("unsloth", "every-2nd", "vision-only"):
        # recomputation changes what is kept, not what is computed (bf16 kernels may differ a little)
        assert runs[name][1] == pytest.approx(losses_off, rel=2e-2), name


def test_killed_unsloth_train_actor_resumes_from_its_checkpoint_on_the_gpu(
    tiny_qwen2_vl: Path, ray_cluster: None, tmp_path: Path
) -> None:
    """The CPU test's kill-and-resume (tests/test_train_stage.py), with the Unsloth engine on a GPU."""
    from test_train_stage import kill_mid_run_and_finish

    from vlm_ray.storage import LocalStore

    store = LocalStore(tmp_path / "run")
    _write_prepared(store, rows=16)
    _, spec = _spec(
        tiny_qwen2_vl,
        store.uri,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=8,
        max_steps=24,  # a GPU step of the tiny model is short: enough of them to kill mid-run
        save_steps=2,
        save_total_limit=2,
        logging_steps=1,
        max_restarts=2,
    )
    summary, _ = kill_mid_run_and_finish(spec, store)
    assert summary["engine"] == "unsloth"
