"""On the GPU machine: the image processor's work on a CUDA stream of its own, its images uploaded
in one copy per size (skipped without CUDA).

On generation's stream, each of the processor's per-image copies waited for the generation
kernels queued ahead of it (inference run 13's profile); on its own stream it must not change a
single prediction, over batches that really overlap.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from test_infer_generation import GREEDY, _rows

from vlm_ray.infer import generation


@pytest.mark.gpu
def test_the_processor_runs_on_a_stream_of_its_own_next_to_generation(tiny_generator_on_cuda):
    import torch

    model, processor = tiny_generator_on_cuda
    device = generation.processor_device(model, processor)
    assert device is not None and device.type == "cuda", "the tiny processor runs on the GPU"
    stream = generation.preprocess_stream(device)
    assert stream is not None and stream != torch.cuda.current_stream(device)


@pytest.mark.gpu
def test_images_reach_the_gpu_as_one_asynchronous_copy_per_size_with_the_same_pixels():
    import io

    import torch
    from PIL import Image

    images = [Image.open(io.BytesIO(r["image"])) for r in _rows([(84, 56), (56, 56), (84, 56)])]
    on_gpu = generation.upload_images(images, torch.device("cuda"))
    on_cpu = generation.upload_images(images, torch.device("cpu"))
    torch.cuda.synchronize()
    assert all(t.is_cuda for t in on_gpu)
    assert all(torch.equal(g.cpu(), c) for g, c in zip(on_gpu, on_cpu, strict=True))


@pytest.mark.gpu
def test_the_processors_own_stream_predicts_exactly_what_generations_stream_does(
    tiny_generator_on_cuda, monkeypatch
):
    model, processor = tiny_generator_on_cuda
    # 14 rows in batches of 4 of two sizes: the next batch is prepared while one generates
    sizes = [(84, 56), (56, 56)] * 7
    table = pa.Table.from_pylist(_rows(sizes))
    own_stream = generation.predict_table(model, processor, table, GREEDY)
    monkeypatch.setattr(generation, "SIDE_STREAM", False)
    one_stream = generation.predict_table(model, processor, table, GREEDY)
    assert [r["id"] for r in own_stream] == [f"row-{i}" for i in range(14)]
    assert all(r["error"] is None and r["tokens"] > 0 for r in own_stream)
    assert [r["prediction"] for r in own_stream] == [r["prediction"] for r in one_stream]
