"""train.host_input_embedding on a GPU: the table leaves GPU memory and stays in host memory
through the Trainer's device placement, and both engines train as they do without it, every
forward taking its rows from the batch. Needs a CUDA GPU (and Unsloth for the Unsloth engine);
skipped elsewhere (docs/gpu.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def test_the_table_leaves_gpu_memory_and_device_placement_leaves_it_on_the_host(
    untied_qwen2_vl: Path, lora_model
) -> None:
    import torch

    from vlm_ray.models.host_input_embedding import move_input_embedding_to_host

    model = lora_model(untied_qwen2_vl, torch.bfloat16).cuda()
    table = model.get_input_embeddings().weight
    nbytes = table.numel() * table.element_size()
    before = torch.cuda.memory_allocated()
    del table

    host = move_input_embedding_to_host(model)

    assert before - torch.cuda.memory_allocated() >= nbytes
    model.to("cuda")  # what accelerate's prepare does for a model that is not quantized
    model.cuda()
    assert host.module.weight.device.type == "cpu"
    assert model.get_output_embeddings().weight.device.type == "cuda"
    ids = torch.tensor([[5, 6, 7, 8]], device="cuda")
    with torch.no_grad():
        assert model(input_ids=ids).logits.device.type == "cuda"
    assert host.looked_up_here == 1


def test_the_train_stage_trains_the_same_with_the_table_on_the_host(
    train_engine: str, untied_qwen2_vl: Path, logged_training_run: Callable
) -> None:
    train = {
        "engine": train_engine,
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "dataloader_num_workers": 2,
    }
    plain, plain_losses = logged_training_run(untied_qwen2_vl, "plain", 8, train)
    assert "host_input_embedding" not in plain
    hosted, hosted_losses = logged_training_run(
        untied_qwen2_vl, "hosted", 8, {**train, "host_input_embedding": True}
    )

    assert hosted["engine"] == train_engine
    assert hosted["host_input_embedding"] == {"served_from_batch": 3, "looked_up_here": 0}
    assert len(hosted_losses) == len(plain_losses) == 3
    # the same rows reach the same kernels; only nondeterministic GPU reductions may differ
    assert hosted_losses == pytest.approx(plain_losses, rel=1e-3)
