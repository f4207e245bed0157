"""Where each stage's outputs live under the run URI: one place for every key name."""

from __future__ import annotations

PREPARED = "prepared"
PREPARED_MANIFEST = "prepared/manifest.json"
QUARANTINE = "prepared/quarantine"
SPLITS = ("train", "heldout")

CHECKPOINTS = "checkpoints"
ADAPTER = "model/adapter"
MERGED = "model/merged"
MODEL_INFO = "model/model_info.json"
TRAIN_METRICS = "train/metrics.jsonl"
TRAIN_SUMMARY = "train/summary.json"
TRAIN_SETTINGS = "train/settings.json"
LOSS_PLOT = "train/loss.png"
TRAIN_PROFILE = "train/profile"  # train.profile_steps: profiler tables + summary.json

INFER_INPUT = "infer_input"  # infer.source, prepared like the training data
PREDICTIONS = "predictions"
EVAL = "eval"
EVAL_METRICS = "eval/metrics.json"
EVAL_REPORT = "eval/report.md"

SPEC = "spec.yaml"


def shard_name(index: int, suffix: str = "parquet") -> str:
    """shard-00012.parquet: zero-padded so keys sort in shard order."""
    return f"shard-{index:05d}.{suffix}"


def prepared_shard(split: str, index: int) -> str:
    return f"{PREPARED}/{split}/{shard_name(index)}"


def predictions_dir(model_tag: str) -> str:
    """predictions/<base|finetuned|...>/ — one predictions file per input shard."""
    return f"{PREDICTIONS}/{model_tag}"
