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

PREDICTIONS = "predictions"  # the held-out split's, per model tag (what evaluate scores)
BULK = "bulk"  # infer.source jobs: bulk/<job>/input/ (prepared) and bulk/<job>/predictions/<tag>/
EVAL = "eval"
EVAL_METRICS = "eval/metrics.json"
EVAL_REPORT = "eval/report.md"

SPEC = "spec.yaml"


def shard_name(index: int, suffix: str = "parquet") -> str:
    """shard-00012.parquet: zero-padded so keys sort in shard order."""
    return f"shard-{index:05d}.{suffix}"


def prepared_shard(split: str, index: int) -> str:
    return f"{PREPARED}/{split}/{shard_name(index)}"


def predictions_root(job: str | None = None) -> str:
    """predictions/ for the held-out split; bulk/<job>/predictions/ for a job over infer.source."""
    return PREDICTIONS if job is None else f"{BULK}/{job}/{PREDICTIONS}"


def predictions_dir(model_tag: str, job: str | None = None) -> str:
    """<predictions_root>/<base|finetuned|...>/ — one predictions file per input shard."""
    return f"{predictions_root(job)}/{model_tag}"


def bulk_input(job: str) -> str:
    """bulk/<job>/input/: infer.source prepared like the training data (all/, quarantine/, manifest)."""
    return f"{BULK}/{job}/input"
