"""Which weights a model tag loads, and loading them for inference with plain transformers + peft (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm_ray import layout
from vlm_ray.config import JobSpec, parse_spec
from vlm_ray.infer.loading import ModelRef, load_for_inference, resolve_model_ref
from vlm_ray.storage import LocalStore, Store


def infer_spec(run_uri: str, model: Path | str, endpoint: str | None = None, **sections) -> JobSpec:
    """A job spec for infer tests: the tiny model, short generations."""
    spec = {
        "run": {"uri": run_uri, "s3_endpoint_url": endpoint},
        "model": {"name": str(model)},
        "data": {"source": "unused"},
        "generation": {"max_new_tokens": 4, "batch_size": 4},
    }
    for name, values in sections.items():
        spec[name] = {**spec.get(name, {}), **values}
    return parse_spec(spec)


def write_random_adapter(store: Store, base: Path, workdir: Path) -> None:
    """A LoRA adapter with non-zero random weights on the tiny model, saved where train would save it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(1)
    model = AutoModelForImageTextToText.from_pretrained(base)
    # init_lora_weights=False: B is random too, so the adapter changes the output from the start.
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(workdir / "adapter")
    AutoProcessor.from_pretrained(base).save_pretrained(workdir / "adapter")
    store.upload_dir(workdir / "adapter", layout.ADAPTER)
    store.write_json(
        layout.MODEL_INFO,
        {"base_model": str(base), "kind": "adapter", "path": layout.ADAPTER, "engine": "hf"},
    )


def first_logits(model, processor) -> torch.Tensor:
    """The model's float32 next-token logits after one white image and a short prompt, on its device."""
    image = Image.new("RGB", (56, 56), "white")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Read."}, {"type": "image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(text=[text], images=[[image]], return_tensors="pt").to(model.device)
    with torch.no_grad():
        return model(**batch).logits[0, -1].float()


def test_base_tag_is_model_name_and_finetuned_is_what_model_info_names(tmp_path, tiny_qwen2_vl):
    store = LocalStore(tmp_path / "run")
    spec = infer_spec(store.uri, tiny_qwen2_vl)
    assert resolve_model_ref(spec, "base") == ModelRef(
        "base", str(tiny_qwen2_vl), None, "model.name"
    )
    store.write_json(
        layout.MODEL_INFO, {"base_model": "org/base", "kind": "adapter", "path": layout.ADAPTER}
    )
    tuned = resolve_model_ref(spec, "finetuned")
    assert (tuned.model_uri, tuned.adapter_uri) == ("org/base", store.uri_of(layout.ADAPTER))
    store.write_json(
        layout.MODEL_INFO, {"base_model": "org/base", "kind": "full", "path": layout.MERGED}
    )
    merged = resolve_model_ref(spec, "finetuned")
    assert (merged.model_uri, merged.adapter_uri) == (store.uri_of(layout.MERGED), None)


def test_another_runs_model_is_loaded_under_its_own_tag(tmp_path, tiny_qwen2_vl):
    champion = LocalStore(tmp_path / "champion")
    champion.write_json(
        layout.MODEL_INFO, {"base_model": "b", "kind": "full", "path": layout.MERGED}
    )
    spec = infer_spec(str(tmp_path / "run"), tiny_qwen2_vl)
    ref = resolve_model_ref(spec, "champion", {"champion": champion.uri})
    assert ref == ModelRef(
        "champion", champion.uri_of(layout.MERGED), None, champion.uri_of(layout.MODEL_INFO)
    )
    with pytest.raises(ValueError, match=r"'other'.*model_runs"):
        resolve_model_ref(spec, "other", {"champion": champion.uri})


def test_finetuned_without_a_trained_model_names_the_missing_file(tmp_path, tiny_qwen2_vl):
    spec = infer_spec(str(tmp_path / "run"), tiny_qwen2_vl)
    with pytest.raises(FileNotFoundError, match=r"model/model_info\.json does not exist.*train"):
        resolve_model_ref(spec, "finetuned")


def test_the_adapter_is_loaded_on_its_base_and_changes_the_output(tmp_path, tiny_qwen2_vl):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    store = LocalStore(tmp_path / "run")
    write_random_adapter(store, tiny_qwen2_vl, tmp_path / "work")
    spec = infer_spec(store.uri, tiny_qwen2_vl)
    base, processor, note = load_for_inference(spec, resolve_model_ref(spec, "base"))
    tuned, _, tuned_note = load_for_inference(spec, resolve_model_ref(spec, "finetuned"))
    assert note.startswith("hf (") and "+ adapter" in tuned_note
    assert processor.tokenizer.padding_side == "left"
    expected_model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl), store.local_path(layout.ADAPTER)
    ).eval()
    base_logits = first_logits(base, processor)
    tuned_logits = first_logits(tuned, processor)
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
    assert torch.allclose(tuned_logits, first_logits(expected_model, processor), atol=1e-4)


def test_a_model_folder_that_needs_remote_code_is_refused_naming_model_trust_remote_code(tmp_path):
    folder = tmp_path / "remote_model"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "tiny_remote_ocr",
                "auto_map": {"AutoModel": "modeling_tiny_remote.TinyRemoteModel"},
            }
        )
    )
    spec = infer_spec(str(tmp_path / "run"), folder)
    with pytest.raises(ValueError, match=r"auto_map.*set model\.trust_remote_code=true"):
        load_for_inference(spec, resolve_model_ref(spec, "base"))


def test_a_model_saved_with_a_truncation_setting_generates_without_one(tmp_path, tiny_qwen2_vl):
    import shutil
    import warnings

    from transformers import AutoTokenizer

    from vlm_ray.infer.generation import prepare_inputs, prompt_messages

    saved = tmp_path / "saved"
    shutil.copytree(tiny_qwen2_vl, saved)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    tokenizer.backend_tokenizer.enable_truncation(max_length=8)  # what a training call leaves
    tokenizer.save_pretrained(saved)
    assert json.loads((saved / "tokenizer.json").read_text())["truncation"]["max_length"] == 8
    spec = infer_spec(str(tmp_path / "run"), saved)

    _, processor, _ = load_for_inference(spec, ModelRef("base", str(saved)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inputs = prepare_inputs(
            processor,
            [Image.new("RGB", (56, 56), "white")],
            [prompt_messages({"prompt": "Read the text in this image, please.", "messages": None})],
        )
    assert not [w for w in caught if "max_length" in str(w.message)]
    assert inputs["input_ids"].shape[1] > 8, "the prompt and its image tokens, whole"
