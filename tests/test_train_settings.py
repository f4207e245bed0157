"""A run trains one model: re-running with changed training settings is refused, naming what changed."""

from __future__ import annotations

import pytest

from vlm_ray.config import SpecError
from vlm_ray.storage import LocalStore


def test_rerun_with_other_training_settings_is_refused_naming_the_keys(
    ray_cluster, tiny_qwen2_vl, write_prepared, tiny_train_spec, tmp_path
):
    from vlm_ray.stages.train import run_train

    run = tmp_path / "run"
    write_prepared(LocalStore(run), rows=4, heldout=1)
    train = {
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "warmup_steps": 0,
    }
    first = run_train(tiny_train_spec(tiny_qwen2_vl, run, train=train))
    assert first["steps"] == 1

    # the same settings (operational knobs aside) find the model and skip
    again = run_train(tiny_train_spec(tiny_qwen2_vl, run, train={**train, "max_restarts": 0}))
    assert again["wall_time_s"] == first["wall_time_s"]

    with pytest.raises(SpecError) as err:
        run_train(
            tiny_train_spec(
                tiny_qwen2_vl, run, train={**train, "learning_rate": 1e-3}, lora={"r": 4}
            )
        )
    message = str(err.value)
    assert "train.learning_rate: 0.0002 -> 0.001" in message
    assert "lora.r: 16 -> 4" in message
    assert "new run.uri" in message


def test_retraining_on_re_prepared_data_is_refused(
    ray_cluster, tiny_qwen2_vl, write_prepared, tiny_train_spec, tmp_path
):
    from vlm_ray.stages.train import run_train

    run = tmp_path / "run"
    store = LocalStore(run)
    write_prepared(store, rows=4, heldout=1)
    train = {
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "warmup_steps": 0,
    }
    run_train(tiny_train_spec(tiny_qwen2_vl, run, train=train))
    manifest = store.read_json("prepared/manifest.json")
    for shard in manifest["shards"]:
        shard["sha256"] = "0" * 64  # as if the data were prepared again with other content
    store.write_json("prepared/manifest.json", manifest)
    with pytest.raises(SpecError, match="prepared train shards differ"):
        run_train(tiny_train_spec(tiny_qwen2_vl, run, train=train))
