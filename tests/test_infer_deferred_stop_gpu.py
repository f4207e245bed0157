"""On the GPU machine: with infer.defer_stop_check the generated tokens are the same (skipped
without CUDA), also when a row stops early and when the whole batch does, which the deferred
check sees one step late and undoes."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from test_infer_generation import _rows

from vlm_ray.infer.deferred_stop import disable_deferred_stop_check, enable_deferred_stop_check
from vlm_ray.infer.generation import generate_batch, prepare_inputs, prompt_messages


def _inputs(processor, n: int):
    rows = _rows([(56, 56)] * n)
    images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows]
    return prepare_inputs(processor, images, [prompt_messages(r) for r in rows])


@pytest.mark.gpu
@pytest.mark.parametrize("cache", [None, "static"])
def test_deferring_the_stop_check_generates_the_same_tokens(tiny_generator_on_cuda, cache):
    model, processor = tiny_generator_on_cuda
    batch, alone = _inputs(processor, 6), _inputs(processor, 1)
    kwargs = {"max_new_tokens": 12, "do_sample": False}
    if cache:
        kwargs["cache_implementation"] = cache
    plain = generate_batch(model, processor, batch, kwargs)
    # The first row's fourth token as the stop token: in the batch that row ends early and
    # the others run on; alone, the whole batch stops after four steps.
    early = {**kwargs, "eos_token_id": plain[0].ids[3], "pad_token_id": plain[0].ids[3]}
    runs = {}
    for deferred in (False, True):
        try:
            if deferred:
                assert enable_deferred_stop_check()
            runs[deferred] = [
                generate_batch(model, processor, batch, kwargs),
                generate_batch(model, processor, batch, early),
                generate_batch(model, processor, alone, early),
            ]
        finally:
            disable_deferred_stop_check()
    for with_it, without in zip(runs[True], runs[False], strict=True):
        assert [g.ids for g in with_it] == [g.ids for g in without]
    stop = plain[0].ids[3]
    assert set(runs[False][1][0].ids[4:]) <= {stop}, "in the batch, row 0 is padded after it"
    assert len(runs[False][2][0].ids) <= 4, "alone, generation ended at the stop token"
    assert len(runs[True][2][0].ids) <= 4, "and the deferred check's extra step was undone"
