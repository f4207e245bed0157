"""train.label_span_logits: the output head and the loss run over each batch's label span only,
and training computes what it computed over every position."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vlm_ray.config import TrainSpec
from vlm_ray.models.families import FAMILIES
from vlm_ray.models.tiny import build_tiny_model
from vlm_ray.storage import LocalStore
from vlm_ray.train.label_span_logits import (
    LabelSpanCollator,
    accepts_logits_to_keep,
    label_span,
    trim_to_label_span,
    with_label_span_logits,
)

TINY_FAMILIES = sorted(name for name, fam in FAMILIES.items() if fam.tiny)
X = -100  # ignored by the loss


def test_the_span_starts_one_before_the_first_labelled_position_of_any_row():
    labels = torch.tensor(
        [
            [X, X, X, X, X, 7, 8, X],
            [X, X, X, 5, 6, X, X, X],  # this row's answer starts earlier
        ]
    )
    # position 2 predicts the label at position 3, so the span is positions 2..7
    assert label_span(labels) == 6


def test_nothing_labelled_or_the_first_position_labelled_keeps_every_position():
    assert label_span(torch.full((2, 5), X)) == 5
    assert label_span(torch.tensor([[4, X, X], [X, X, X]])) == 3
    assert label_span(torch.tensor([[X, 4, X]])) == 3  # from position 0: everything


def test_the_span_rounds_up_to_the_padding_multiple_but_never_past_the_length():
    labels = torch.full((1, 128), X)
    labels[0, 100:110] = 1
    assert label_span(labels) == 29
    assert label_span(labels, multiple=16) == 32
    assert label_span(labels, multiple=64) == 64
    assert label_span(labels, multiple=256) == 128


def test_a_trimmed_batch_keeps_its_inputs_and_asks_for_the_spans_logits():
    batch = {"input_ids": torch.arange(12).reshape(2, 6), "labels": torch.full((2, 6), X)}
    batch["labels"][1, 4:] = torch.tensor([9, 9])
    trimmed = trim_to_label_span(dict(batch))
    assert trimmed["logits_to_keep"] == 3
    assert torch.equal(trimmed["labels"], batch["labels"][:, 3:])
    assert torch.equal(trimmed["input_ids"], batch["input_ids"])
    untouched = trim_to_label_span({"input_ids": batch["input_ids"]})
    assert "logits_to_keep" not in untouched


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny_family_model(request: pytest.FixtureRequest, models_dir: Path) -> Path:
    return build_tiny_model(models_dir / request.param, family=request.param, size="tiny")


def test_every_family_trains_the_same_from_the_label_span_as_from_every_position(
    tiny_family_model: Path, lora_model, sft_collator, two_sft_examples, loss_and_lora_grads
):
    model = lora_model(tiny_family_model, dtype=torch.float32)
    collator = sft_collator(tiny_family_model, dtype=torch.float32)
    assert accepts_logits_to_keep(model)

    batch = collator(two_sft_examples())
    trimmed = LabelSpanCollator(collator)(two_sft_examples())
    length = batch["labels"].shape[1]
    assert trimmed["logits_to_keep"] < length  # image and prompt tokens carry no labels
    assert trimmed["labels"].shape[1] == trimmed["logits_to_keep"]

    loss, grads = loss_and_lora_grads(model, batch)
    span_loss, span_grads = loss_and_lora_grads(model, trimmed)
    assert torch.allclose(loss, span_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == span_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.allclose(grads[name], span_grads[name], rtol=1e-4, atol=1e-6), name


def test_the_train_stage_with_a_worker_collating_trains_the_same_model(
    tiny_qwen2_vl: Path, logged_training_run, caplog
):
    train = {"max_steps": 2, "per_device_train_batch_size": 2, "dataloader_num_workers": 1}
    plain, plain_losses = logged_training_run(
        tiny_qwen2_vl, "plain", 4, {**train, "label_span_logits": False}
    )
    with caplog.at_level(logging.INFO, logger="vlm_ray.train.label_span_logits"):
        span, span_losses = logged_training_run(tiny_qwen2_vl, "span", 4, train)
    assert "label_span_logits" not in plain
    # every forward on the training loop got a batch the loader's worker had cut
    assert span["label_span_logits"] == {"forwards": 2, "cut": 2}
    assert "from each batch's first labelled position" in caplog.text
    assert len(span_losses) == 2
    assert span_losses == pytest.approx(plain_losses, rel=1e-5)


def test_a_model_whose_forward_takes_no_logits_to_keep_is_left_alone_with_a_warning(caplog):
    class Head(torch.nn.Module):
        def forward(self, input_ids, labels=None):
            return input_ids

    class Trainer:
        data_collator = object()

    trainer = Trainer()
    collator = trainer.data_collator
    with caplog.at_level(logging.WARNING, logger="vlm_ray.train.label_span_logits"):
        assert with_label_span_logits(trainer, Head(), TrainSpec(label_span_logits=True)) is None
    assert "Head's forward takes no logits_to_keep" in caplog.text
    assert trainer.data_collator is collator


def test_a_run_may_switch_it_on_or_off_as_it_does_not_change_what_is_trained(
    tiny_qwen2_vl: Path, tiny_train_spec, tmp_path: Path
):
    from vlm_ray.train.settings_guard import training_settings

    store = LocalStore(tmp_path / "run")
    span = tiny_train_spec(tiny_qwen2_vl, tmp_path / "run")
    plain = tiny_train_spec(tiny_qwen2_vl, tmp_path / "run", train={"label_span_logits": False})
    assert span.train.label_span_logits is True  # the default
    assert training_settings(plain, store) == training_settings(span, store)
