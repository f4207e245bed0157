"""Resuming from a checkpoint in object storage continues the run exactly: same data order, optimizer,
scheduler and RNG (dropout) as a run that was never interrupted."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import TrainerCallback

from vlm_ray.storage import LocalStore
from vlm_ray.train.checkpoints import CheckpointSync, download_latest_checkpoint
from vlm_ray.train.hf_engine import train_hf
from vlm_ray.train.metrics_log import MetricsLog, read_metrics


class StopAfter(TrainerCallback):
    """Ends training after a given step, as a crash would (no save at that step)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}  # dropout: RNG must be restored
TRAIN = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_steps": 6,  # 4 steps per epoch: the resumed part crosses an epoch
    "save_steps": 2,
    "logging_steps": 1,
    "warmup_steps": 1,
    "learning_rate": 5e-3,
}


def _train(spec, store, workdir: Path, resume_from=None, extra=()):
    callbacks = [MetricsLog(store, print_progress=False), CheckpointSync(store, keep=2), *extra]
    return train_hf(spec, store, workdir, resume_from, callbacks)


@pytest.mark.parametrize(
    "sampling",
    [{}, {"group_by_length": True}],
    ids=["random-batches", "length-grouped-batches"],
)
def test_resumed_run_matches_an_uninterrupted_run_step_for_step(
    tiny_qwen2_vl, write_prepared, tiny_train_spec, tmp_path, sampling
):
    train = {**TRAIN, **sampling}
    whole = LocalStore(tmp_path / "whole")
    write_prepared(whole, rows=8)
    _train(
        tiny_train_spec(tiny_qwen2_vl, tmp_path / "whole", lora=LORA, train=train),
        whole,
        tmp_path / "w1" / "a",
    )

    cut = LocalStore(tmp_path / "cut")
    write_prepared(cut, rows=8)
    spec = tiny_train_spec(tiny_qwen2_vl, tmp_path / "cut", lora=LORA, train=train)
    first = _train(spec, cut, tmp_path / "w2" / "a", extra=[StopAfter(3)])
    assert first["global_step"] == 3
    resume_from = download_latest_checkpoint(cut, tmp_path / "w2" / "resume")
    assert resume_from is not None and resume_from.endswith("checkpoint-2")
    second = _train(spec, cut, tmp_path / "w2" / "b", resume_from=resume_from)
    assert second["global_step"] == 6 and second["resumed_from"] == resume_from

    expected = [r for r in read_metrics(whole) if "loss" in r]
    got = [r for r in read_metrics(cut) if "loss" in r]
    # step 3 of the first attempt was discarded: each step is logged once
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, got, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"]), (a, b)
        assert a["learning_rate"] == b["learning_rate"]
