"""train.label_span_logits on the GPU, through both engines' train stage: Unsloth's compiled
forward and fused loss take the cut labels and logits_to_keep, and the run's losses match the
same run over every position. Skipped elsewhere (docs/gpu.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def test_the_train_stage_trains_the_same_from_the_label_span(
    train_engine: str, tiny_qwen2_vl: Path, logged_training_run: Callable
) -> None:
    train = {"engine": train_engine, "max_steps": 3, "per_device_train_batch_size": 2}
    plain, plain_losses = logged_training_run(
        tiny_qwen2_vl, "plain", 8, {**train, "label_span_logits": False}
    )
    span, span_losses = logged_training_run(tiny_qwen2_vl, "span", 8, train)

    assert span["engine"] == train_engine
    assert "label_span_logits" not in plain
    assert span["label_span_logits"] == {"forwards": 3, "cut": 3}
    assert len(span_losses) == len(plain_losses) == 3
    assert span_losses == pytest.approx(plain_losses, rel=1e-3)
