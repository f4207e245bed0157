"""On the GPU machine: the infer stage loads through Unsloth (FastVisionModel.for_inference) in a
num_gpus=1 Ray actor and predicts every held-out row once (skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from test_infer_loading import infer_spec

from vlm_ray import layout
from vlm_ray.storage import LocalStore


@pytest.mark.gpu
def test_unsloth_inference_path_predicts_every_row_once_on_a_gpu_actor(
    ray_cluster, write_prepared, tiny_qwen2_vl, tmp_path
):
    pytest.importorskip("unsloth")
    from vlm_ray.stages.infer import run_infer

    store = LocalStore(tmp_path / "run")
    recs = write_prepared(store, rows=2, heldout=6, rows_per_shard=3)
    spec = infer_spec(store.uri, tiny_qwen2_vl, train={"engine": "unsloth"})
    manifest = run_infer(spec, models=["base"])["models"]["base"]
    rows = [
        json.loads(line)
        for key in store.list(layout.predictions_dir("base"))
        if key.endswith(".jsonl") and "/_done/" not in key
        for line in store.read_text(key).splitlines()
    ]
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in recs[2:])
    assert manifest["errors"] == 0 and all(r["tokens"] > 0 for r in rows)


@pytest.mark.gpu
def test_unsloth_engine_merges_a_16bit_adapter_and_predicts_what_peft_predicts(
    tiny_qwen2_vl, tmp_path
):
    pytest.importorskip("unsloth")
    from peft import PeftModel
    from test_infer_loading import first_logits, write_random_adapter
    from transformers import AutoModelForImageTextToText

    from vlm_ray.infer.loading import load_for_inference, resolve_model_ref

    store = LocalStore(tmp_path / "run")
    write_random_adapter(store, tiny_qwen2_vl, tmp_path / "work")
    spec = infer_spec(store.uri, tiny_qwen2_vl, train={"engine": "unsloth"})
    tuned, processor, note = load_for_inference(spec, resolve_model_ref(spec, "finetuned"))
    assert note.startswith("unsloth (") and "+ adapter" in note
    assert not [n for n, _ in tuned.named_parameters() if "lora_" in n], "merged into the base"

    reference = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=tuned.dtype)
    reference = reference.to(tuned.device).eval()
    base = first_logits(reference, processor)
    unmerged = first_logits(
        PeftModel.from_pretrained(reference, store.local_path(layout.ADAPTER)).eval(), processor
    )
    merged = first_logits(tuned, processor)
    # bf16 rounding differs between a merged weight and base + LoRA, far less than the adapter's effect
    assert (merged - unmerged).abs().max() < 0.1 * (unmerged - base).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("scope", "compile_vision", "compile_language", "scaling", "vision_attention"),
    [
        ("vision", False, False, "row", "auto"),
        ("all", True, False, "row", "auto"),
        ("all", True, True, "row", "auto"),
        ("vision", True, False, "tensor", "cudnn"),
    ],
    ids=[
        "vision",
        "all+compiled vision",
        "all+compiled vision and language",
        "vision per-tensor+compiled vision on cuDNN attention",
    ],
)
def test_fp8_layers_run_in_float8_and_stay_close_to_bf16(
    scope, compile_vision, compile_language, scaling, vision_attention, tiny_qwen2_vl, tmp_path
):
    pytest.importorskip("torchao")
    import torch
    import torch._inductor.config as inductor_config
    from test_infer_loading import first_logits
    from transformers import AutoModelForImageTextToText

    from vlm_ray.infer.generation import generate_batch, prepare_inputs, prompt_messages
    from vlm_ray.infer.loading import load_for_inference, resolve_model_ref
    from vlm_ray.models.fp8_linear import fp8_target_linears

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 GEMMs need compute capability 8.9+")
    spec = infer_spec(
        str(tmp_path / "run"),
        tiny_qwen2_vl,
        infer={
            "engine": "hf",
            "fp8": scope,
            "compile_vision": compile_vision,
            "compile_language": compile_language,
            "fp8_scaling": scaling,
            "vision_attention": vision_attention,
        },
    )
    model, processor, note = load_for_inference(spec, resolve_model_ref(spec, "base"))
    # torchao's own default would turn on minutes of kernel tuning for every compile after it
    assert inductor_config.coordinate_descent_tuning is False
    reference = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.bfloat16)
    reference = reference.to("cuda").eval()
    assert f"float8 linear layers ({scope}, per-{scaling} scales)" in note
    assert ("(cuDNN first)" in note) == (vision_attention == "cudnn")
    in_float8 = {
        name
        for name, module in model.named_modules()
        if "Float8" in type(getattr(module, "weight", None)).__name__
    }
    assert in_float8 == set(fp8_target_linears(reference, scope))

    got, want = first_logits(model, processor), first_logits(reference, processor)
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.98
    images = [Image.new("RGB", (56, 56), colour) for colour in ("white", "black", "red")]
    messages = [prompt_messages({"prompt": "Read.", "messages": None})] * len(images)
    inputs = prepare_inputs(processor, images, messages, "cuda")
    outs = generate_batch(model, processor, inputs, {"max_new_tokens": 4, "min_new_tokens": 4})
    assert [o.tokens for o in outs] == [4, 4, 4]


@pytest.mark.gpu
def test_two_copies_on_one_gpu_each_record_how_they_shared_it(
    ray_cluster, write_prepared, tiny_qwen2_vl, tmp_path
):
    from vlm_ray.infer.gpu_sharing import mps_daemon_listening
    from vlm_ray.stages.infer import run_infer

    store = LocalStore(tmp_path / "run")
    write_prepared(store, rows=2, heldout=12, rows_per_shard=3)
    spec = infer_spec(store.uri, tiny_qwen2_vl, infer={"actors_per_gpu": 2, "engine": "hf"})
    actors = run_infer(spec, models=["base"])["models"]["base"]["actors"]

    # the driver runs on the actors' node here, so it sees the same pipe directory they did
    expected = "mps" if mps_daemon_listening() else "time-sliced"
    assert len(actors) == 2, actors
    assert all(a["gpu_sharing"] == expected for a in actors.values()), actors
    assert all(a["gpu_peak_gib"] and a["gpu_total_gib"] for a in actors.values()), actors
