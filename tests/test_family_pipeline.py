"""Each family through the real pipeline on CPU: response-only labels from the family's markers, then
prepare (Ray tasks) → train (Ray actor, transformers+PEFT) → infer (Ray actors) → evaluate on a
handful of real digit images, with nothing in the spec but model.name telling the families apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vlm_ray import layout
from vlm_ray.config import load_spec
from vlm_ray.models.families import FAMILIES, family_of
from vlm_ray.models.tiny import build_tiny_model
from vlm_ray.storage import open_store
from vlm_ray.train.collator import IGNORE_INDEX, VisionSFTCollator

ROOT = Path(__file__).parent.parent
TINY = sorted(name for name, fam in FAMILIES.items() if fam.tiny)


@pytest.fixture(scope="module", params=TINY)
def family_model(request: pytest.FixtureRequest, models_dir: Path) -> Path:
    return build_tiny_model(models_dir / request.param, family=request.param, size="tiny")


def _row(answer: str, size: tuple[int, int]) -> dict:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((6, size[1] // 2 - 6), answer, fill="black")
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Read the number."}, {"type": "image"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [img],
    }


def test_response_only_labels_keep_just_the_answer_and_its_end_of_turn(family_model: Path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(family_model)
    family = family_of(family_model)
    collator = VisionSFTCollator(
        processor, family, train_on_responses_only=True, max_seq_length=1024
    )
    # two answers of different lengths on different image sizes: the batch is padded
    batch = collator([_row("417", (56, 56)), _row("90210 3", (84, 56))])
    tok = processor.tokenizer
    for i, answer in enumerate(("417", "90210 3")):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        kept = labels != IGNORE_INDEX
        assert bool(kept.any())
        # kept labels are the input ids themselves, in one contiguous run at the answer
        assert (labels[kept] == ids[kept]).all()
        where = kept.nonzero().flatten().tolist()
        assert where == list(range(where[0], where[-1] + 1))
        learnt = tok.decode(ids[kept].tolist(), skip_special_tokens=False)
        assert learnt.startswith(answer), learnt
        tail = learnt[len(answer) :].strip()
        # after the answer only the turn's end: <|im_end|>, <|eot_id|>, <end_of_turn>, </s>
        assert tail in family.stop_tokens, (learnt, family.stop_tokens)
        # everything before the answer (prompt, image tokens, markers, padding) is masked
        before = tok.decode(ids[: where[0]].tolist(), skip_special_tokens=False)
        assert before.endswith(family.response_part)


def test_without_response_only_the_prompt_is_learnt_too_but_never_image_or_pad_tokens(
    family_model: Path,
):
    from transformers import AutoProcessor

    from vlm_ray.train.collator import masked_token_ids

    processor = AutoProcessor.from_pretrained(family_model)
    collator = VisionSFTCollator(
        processor, family_of(family_model), train_on_responses_only=False, max_seq_length=1024
    )
    batch = collator([_row("417", (56, 56)), _row("90210 3", (84, 56))])
    kept = batch["labels"] != IGNORE_INDEX
    text = processor.tokenizer.decode(batch["input_ids"][0][kept[0]].tolist())
    assert "Read the number." in text
    masked = masked_token_ids(processor)
    import torch

    assert not torch.isin(batch["labels"][kept], masked).any()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlm_ray.demo_data import write_digits_dataset

    return write_digits_dataset(tmp_path_factory.mktemp("family_digits"), limit=8)


# Qwen2-VL goes through the same stages in test_pipeline_e2e.py (and must learn there).
PIPELINE_FAMILIES = [name for name in TINY if name != "qwen2_vl"]


@pytest.mark.parametrize("family_name", PIPELINE_FAMILIES)
def test_family_runs_prepare_train_infer_evaluate_on_cpu(
    ray_cluster: None, family_name: str, models_dir: Path, digits: Path, tmp_path: Path
):
    from vlm_ray.stages.evaluate import run_evaluate
    from vlm_ray.stages.infer import run_infer
    from vlm_ray.stages.prepare import run_prepare
    from vlm_ray.stages.train import run_train

    family_model = build_tiny_model(models_dir / family_name, family=family_name, size="tiny")
    family = family_of(family_model)
    spec = load_spec(
        ROOT / "examples/demo.yaml",
        [
            f"run.uri={tmp_path / 'run'}",
            f"model.name={family_model}",  # the only family-specific value
            f"data.source={digits}",
            "data.heldout_fraction=0.25",
            "model.full_finetuning=false",
            "lora.r=4",
            "lora.lora_alpha=4",
            "train.max_steps=2",
            "train.per_device_train_batch_size=2",
            "train.warmup_steps=0",
            "train.logging_steps=1",
            "generation.max_new_tokens=4",
            "generation.batch_size=4",
            # the fine-tuned tag loads base + adapter: the family-specific loading path
            "infer.models=[finetuned]",
        ],
    )
    prepared = run_prepare(spec)
    assert prepared["rows_ok"] == 8 and prepared["rows_quarantined"] == 0
    heldout = prepared["splits"]["heldout"]
    assert heldout >= 1

    summary = run_train(spec)
    engine = summary["engine_summary"]
    assert engine["family"] == family.name and summary["engine"] == "hf"
    assert summary["global_step"] == 2
    # LoRA: only adapter weights train
    assert 0 < engine["trainable_params"] < engine["total_params"] / 2

    run_infer(spec)
    metrics = run_evaluate(spec)

    store = open_store(spec.run.uri)
    assert store.read_json(layout.MODEL_INFO)["family"] == family.name
    assert metrics["rows"] == heldout
    assert list(metrics["models"]) == ["finetuned"]
    for tag in ("finetuned",):
        scores = metrics["models"][tag]
        assert scores["cer"] >= 0.0 and 0.0 <= scores["exact_match"] <= 1.0
        lines = [
            line
            for key in store.list(layout.predictions_dir(tag))
            if key.endswith(".jsonl") and "/_done/" not in key
            for line in store.read_text(key).splitlines()
        ]
        assert len(lines) == heldout, f"{family.name} {tag}: every held-out row predicted once"
        assert all('"error": null' in line for line in lines), lines[:1]
