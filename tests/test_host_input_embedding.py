"""train.host_input_embedding (vlm_ray/models/host_input_embedding.py): the frozen input embedding
table stays in host memory, the collator looks the batch's rows up, and the model computes what it
computed with the table on it.

On CPU the host is the device, so these check the mechanism and the maths; the GPU memory it saves
is measured by bench/train_speed.py, and tests/test_host_input_embedding_gpu.py checks placement.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vlm_ray.config import parse_spec
from vlm_ray.models.host_input_embedding import (
    HOST_EMBEDS_KEY,
    HostEmbeddingCollator,
    move_input_embedding_to_host,
    with_host_embedding_lookup,
)
from vlm_ray.storage import LocalStore


def test_rows_from_the_collator_train_exactly_as_the_table_on_the_model(
    untied_qwen2_vl: Path, lora_model, sft_collator, two_sft_examples, loss_and_lora_grads
):
    reference, moved = lora_model(untied_qwen2_vl), lora_model(untied_qwen2_vl)
    collator = sft_collator(untied_qwen2_vl)
    host = move_input_embedding_to_host(moved)
    assert host is not None

    batch = collator(two_sft_examples())
    with_rows = HostEmbeddingCollator(collator, host)(two_sft_examples())
    assert with_rows[HOST_EMBEDS_KEY].shape == (*batch["input_ids"].shape, 64)

    loss, grads = loss_and_lora_grads(reference, batch)
    moved_loss, moved_grads = loss_and_lora_grads(moved, with_rows)
    assert torch.equal(loss, moved_loss)
    assert grads.keys() == moved_grads.keys() and len(grads) > 0
    assert all(torch.equal(grads[n], moved_grads[n]) for n in grads)
    assert (host.served_from_batch, host.looked_up_here) == (1, 0)


def test_a_call_without_rows_looks_up_by_itself_and_computes_the_same(
    untied_qwen2_vl: Path, lora_model
):
    reference, moved = lora_model(untied_qwen2_vl).eval(), lora_model(untied_qwen2_vl).eval()
    host = move_input_embedding_to_host(moved)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids).logits, moved(input_ids=ids).logits)
    assert (host.served_from_batch, host.looked_up_here) == (0, 1)


def test_rows_a_forward_left_unused_never_serve_the_next_call(untied_qwen2_vl: Path, lora_model):
    """Rows of another shape than the ids are not used, and a forward that fails (here: an
    image without its image tokens) drops them: a later call of their shape looks up its own."""
    reference, moved = lora_model(untied_qwen2_vl).eval(), lora_model(untied_qwen2_vl).eval()
    host = move_input_embedding_to_host(moved)
    stale = {HOST_EMBEDS_KEY: torch.zeros(1, 4, 64)}
    image = {"pixel_values": torch.randn(4, 1176), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    with torch.no_grad(), pytest.raises(ValueError, match=r"[Ii]mage"):
        moved(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), **image, **stale)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids).logits, moved(input_ids=ids).logits)
    assert host.served_from_batch == 0


def test_device_placement_leaves_the_table_in_host_memory_but_dtype_changes_apply(
    untied_qwen2_vl: Path, lora_model
):
    model = lora_model(untied_qwen2_vl)
    host = move_input_embedding_to_host(model)
    model.to("meta")  # stands in for .to("cuda") here: any device that is not the host
    assert host.module.weight.device.type == "cpu"
    assert model.get_output_embeddings().weight.device.type == "meta"
    host.module.to(torch.bfloat16)
    assert host.module.weight.dtype == torch.bfloat16


def test_a_table_tied_to_lm_head_stays_where_it_is_with_a_warning(
    tiny_qwen2_vl: Path, lora_model, caplog
):
    model = lora_model(tiny_qwen2_vl)
    with caplog.at_level(logging.WARNING):
        assert move_input_embedding_to_host(model) is None
    assert "tied to lm_head" in caplog.text


def test_a_trained_table_stays_where_it_is_with_a_warning(untied_qwen2_vl: Path, caplog):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(untied_qwen2_vl)  # all weights trainable
    with caplog.at_level(logging.WARNING):
        assert move_input_embedding_to_host(model) is None
    assert "is trained" in caplog.text


@pytest.mark.parametrize(
    ("model", "named"),
    [
        ({"full_finetuning": True}, "model.full_finetuning"),
        ({"offload_embedding": True}, "model.offload_embedding"),
    ],
)
def test_a_spec_that_also_trains_or_offloads_the_table_is_refused_naming_both(
    model: dict, named: str
):
    raw = {
        "model": {"name": "m", **model},
        "data": {"source": "s"},
        "train": {"host_input_embedding": True},
    }
    with pytest.raises(ValueError) as err:
        parse_spec(raw)
    assert "train.host_input_embedding" in str(err.value) and named in str(err.value)


def test_the_train_stage_with_a_worker_collating_trains_the_same_model(
    untied_qwen2_vl: Path, logged_training_run
):
    """Through the stage: the data loader's worker process looks the rows up, every forward
    takes them from the batch, and the run's losses match a run without the setting."""
    train = {"max_steps": 2, "per_device_train_batch_size": 2, "dataloader_num_workers": 1}
    plain, plain_losses = logged_training_run(untied_qwen2_vl, "plain", 4, train)
    hosted, hosted_losses = logged_training_run(
        untied_qwen2_vl, "hosted", 4, {**train, "host_input_embedding": True}
    )
    assert "host_input_embedding" not in plain
    assert hosted["host_input_embedding"] == {"served_from_batch": 2, "looked_up_here": 0}
    assert len(hosted_losses) == 2 and hosted_losses == plain_losses


def test_a_run_may_switch_it_on_or_off_as_it_does_not_change_what_is_trained(
    untied_qwen2_vl: Path, tiny_train_spec, tmp_path: Path
):
    from vlm_ray.train.settings_guard import training_settings

    store = LocalStore(tmp_path / "run")
    plain = tiny_train_spec(untied_qwen2_vl, tmp_path / "run")
    hosted = tiny_train_spec(
        untied_qwen2_vl, tmp_path / "run", train={"host_input_embedding": True}
    )
    assert plain.train.host_input_embedding is False
    assert training_settings(plain, store) == training_settings(hosted, store)


@pytest.mark.parametrize(("workers", "warned"), [(0, True), (1, False)])
def test_looking_up_without_a_loader_worker_is_allowed_but_warned(
    untied_qwen2_vl: Path,
    lora_model,
    sft_collator,
    tmp_path: Path,
    caplog,
    workers: int,
    warned: bool,
):
    from transformers import Trainer, TrainingArguments

    model = lora_model(untied_qwen2_vl)
    host = move_input_embedding_to_host(model)
    args = TrainingArguments(str(tmp_path), dataloader_num_workers=workers, report_to="none")
    trainer = Trainer(model=model, args=args, data_collator=sft_collator(untied_qwen2_vl))
    with caplog.at_level(logging.WARNING):
        with_host_embedding_lookup(trainer, host)
    assert isinstance(trainer.data_collator, HostEmbeddingCollator)
    assert ("dataloader_num_workers: 0" in caplog.text) is warned
