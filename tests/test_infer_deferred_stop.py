"""infer.defer_stop_check: transformers' deferred stop check, switched on for CUDA only.

The CPU half: what the switch allows and refuses, and that a CPU job is left as it was. The GPU
half (tests/test_infer_deferred_stop_gpu.py) checks the tokens are the same.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.utils import DeferredStopCheck

from vlm_ray.config import parse_spec
from vlm_ray.infer.deferred_stop import disable_deferred_stop_check, enable_deferred_stop_check
from vlm_ray.infer.loading import ModelRef, load_for_inference


@pytest.fixture
def deferred():
    assert enable_deferred_stop_check()
    yield
    disable_deferred_stop_check()


def test_upstream_defers_on_apples_gpus_only():
    assert not DeferredStopCheck.is_supported(torch.device("cuda"), None, False, False)


def test_switched_on_it_defers_on_cuda_but_not_on_the_cpu_which_has_no_events(deferred):
    assert DeferredStopCheck.is_supported(torch.device("cuda"), None, False, False)
    assert not DeferredStopCheck.is_supported(torch.device("cpu"), None, False, False)


def test_upstreams_other_conditions_still_hold(deferred):
    # assisted decoding keeps the plain check
    assert not DeferredStopCheck.is_supported(torch.device("cuda"), None, False, True)


def test_switching_it_off_restores_upstream(deferred):
    disable_deferred_stop_check()
    assert not DeferredStopCheck.is_supported(torch.device("cuda"), None, False, False)
    disable_deferred_stop_check()  # twice is harmless


def test_on_the_cpu_the_loader_leaves_the_stop_check_as_it_is(tiny_qwen2_vl, tmp_path):
    spec = parse_spec(
        {
            "run": {"uri": str(tmp_path)},
            "model": {"name": str(tiny_qwen2_vl)},
            "data": {"source": "unused"},
            "train": {"engine": "hf"},
            "infer": {"defer_stop_check": True},
        }
    )
    _, _, note = load_for_inference(spec, ModelRef("base", str(tiny_qwen2_vl)))
    assert "stop check deferred" not in note
    assert not DeferredStopCheck.is_supported(torch.device("cuda"), None, False, False)
