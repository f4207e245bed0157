"""What the train stage saves loads with plain transformers + peft: the LoRA adapter on its base model,
and the merged model on its own; full fine-tuning saves a whole model and no adapter."""

from __future__ import annotations

import io
import json

import torch
from PIL import Image

from vlm_ray import layout
from vlm_ray.storage import LocalStore
from vlm_ray.train.hf_engine import train_hf

SAVE = {"adapter": True, "merged_16bit": True}
TRAIN = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_steps": 2,
    "save_steps": 100,
    "warmup_steps": 0,
    "learning_rate": 5e-2,  # big steps: the adapter must visibly change the outputs
}


def _inputs(processor, recs: list[dict]):
    rec = recs[0]
    image = Image.open(io.BytesIO(rec["image"])).convert("RGB")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": rec["prompt"]}, {"type": "image"}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=[[image]], return_tensors="pt")


def test_adapter_and_merged_model_load_with_plain_transformers_and_peft(
    tiny_qwen2_vl, write_prepared, tiny_train_spec, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    store = LocalStore(tmp_path / "run")
    recs = write_prepared(store, rows=4)
    spec = tiny_train_spec(tiny_qwen2_vl, tmp_path / "run", save=SAVE, train=TRAIN)
    out = train_hf(spec, store, tmp_path / "work" / "a", None, [])
    assert out["kind"] == "adapter" and out["global_step"] == 2
    adapter_dir = store.local_path(layout.ADAPTER)
    merged_dir = store.local_path(layout.MERGED)
    assert (adapter_dir / "adapter_config.json").exists()
    assert (adapter_dir / "adapter_model.safetensors").exists()

    processor = AutoProcessor.from_pretrained(adapter_dir)  # the processor travels with the adapter
    for saved in (adapter_dir, merged_dir):
        # training tokenized with truncation; the saved tokenizer does not keep it as a default
        assert json.loads((saved / "tokenizer.json").read_text())["truncation"] is None
    batch = _inputs(processor, recs)
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**batch).logits
    tuned = PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    assert merged.dtype == torch.bfloat16  # save.merged_16bit
    with torch.no_grad():
        tuned_logits = tuned(**batch).logits
        merged_logits = merged(**batch).logits.float()
        for model in (tuned, merged):
            generated = model.generate(**batch, max_new_tokens=1, do_sample=False)
            assert generated.shape[1] == batch["input_ids"].shape[1] + 1
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)  # the adapter is loaded
    # merged = base + adapter, up to bf16 rounding
    assert torch.allclose(merged_logits, tuned_logits, atol=0.1, rtol=0.05)


def test_full_finetuning_saves_a_whole_model_and_no_adapter(
    tiny_qwen2_vl, write_prepared, tiny_train_spec, tmp_path
):
    from transformers import AutoModelForImageTextToText

    store = LocalStore(tmp_path / "run")
    write_prepared(store, rows=4)
    spec = tiny_train_spec(
        tiny_qwen2_vl, tmp_path / "run", model={"full_finetuning": True}, save=SAVE, train=TRAIN
    )
    out = train_hf(spec, store, tmp_path / "work" / "a", None, [])
    assert out["kind"] == "full"
    assert not store.exists(f"{layout.ADAPTER}/adapter_config.json")
    model = AutoModelForImageTextToText.from_pretrained(store.local_path(layout.MERGED))
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl)
    changed = [
        name
        for (name, p), q in zip(model.named_parameters(), base.parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert any("visual" in n for n in changed) and any("language_model" in n for n in changed)
