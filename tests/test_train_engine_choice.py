"""The engine is chosen in one place, from train.engine and the hardware, and says why."""

from __future__ import annotations

import pytest
import torch

from vlm_ray.config import parse_spec
from vlm_ray.train.engine import (
    EngineUnavailableError,
    choose_engine,
    unsloth_only_settings_changed,
)

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only choice")


def _spec(engine: str, run_uri: str = "unused"):
    return parse_spec(
        {
            "run": {"uri": run_uri},
            "model": {"name": "unused"},
            "data": {"source": "unused"},
            "train": {"engine": engine},
        }
    )


@needs_cpu_only
def test_auto_without_a_gpu_picks_the_transformers_peft_engine_and_says_why():
    name, reason = choose_engine(_spec("auto"))
    assert name == "hf"
    assert "no CUDA GPU" in reason


@needs_cpu_only
def test_hf_is_used_when_asked_for():
    assert choose_engine(_spec("hf"))[0] == "hf"


@needs_cpu_only
def test_unsloth_without_a_gpu_fails_with_what_to_do():
    with pytest.raises(EngineUnavailableError, match=r"needs a CUDA GPU.*train\.engine=auto"):
        choose_engine(_spec("unsloth"))


@needs_cpu_only
def test_train_stage_refuses_unsloth_on_a_cluster_without_gpus_before_starting_an_actor(
    ray_cluster, tmp_path
):
    from vlm_ray.stages.train import run_train

    with pytest.raises(EngineUnavailableError, match="this Ray cluster has none"):
        run_train(_spec("unsloth", str(tmp_path / "run")))
    assert not (tmp_path / "run" / "train").exists()


@needs_cpu_only
def test_infer_engine_overrides_train_engine_for_inference_and_is_named_in_errors():
    def spec(infer_engine: str):
        return parse_spec(
            {
                "run": {"uri": "unused"},
                "model": {"name": "unused"},
                "data": {"source": "unused"},
                "train": {"engine": "unsloth"},
                "infer": {"engine": infer_engine},
            }
        )

    assert choose_engine(spec("hf"), "infer") == ("hf", "infer.engine=hf (CPU)")
    with pytest.raises(EngineUnavailableError, match=r"infer\.engine=unsloth needs a CUDA GPU"):
        choose_engine(spec("unsloth"), "infer")
    with pytest.raises(EngineUnavailableError, match=r"train\.engine=unsloth needs a CUDA GPU"):
        choose_engine(spec("hf"))  # training still follows train.engine


def test_unsloth_only_settings_moved_off_their_defaults_are_named_for_the_other_engine():
    """The train stage warns with these when it trains with transformers+PEFT instead."""
    assert unsloth_only_settings_changed(_spec("auto")) == []
    spec = parse_spec(
        {
            "run": {"uri": "unused"},
            "model": {"name": "unused"},
            "data": {"source": "unused"},
            "train": {
                "compile_vision": True,
                "cuda_graphs": True,
                "checkpoint_scope": "vision",
                "fused_lora_mlp": True,  # its default: nothing to say
            },
        }
    )
    assert unsloth_only_settings_changed(spec) == ["train.compile_vision", "train.cuda_graphs"]
    # What the train actor receives: the whole spec as data, every field present.
    from vlm_ray.config import spec_to_dict

    again = parse_spec(spec_to_dict(spec))
    assert unsloth_only_settings_changed(again) == ["train.compile_vision", "train.cuda_graphs"]
