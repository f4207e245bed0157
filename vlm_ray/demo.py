"""The embedded default: a tiny Qwen2-VL and the digits dataset, built locally for examples/demo.yaml."""

from __future__ import annotations

import logging
from pathlib import Path

from vlm_ray.demo_data import write_digits_dataset
from vlm_ray.models.tiny import build_tiny_model

log = logging.getLogger(__name__)


def build_demo_assets(root: str | Path = ".cache/demo") -> dict[str, Path]:
    """Build (or reuse) <root>/model (random-weight Qwen2-VL, "small") and <root>/digits (JSONL + PNGs)."""
    root = Path(root)
    model = build_tiny_model(root / "model", family="qwen2_vl", size="small")
    data = write_digits_dataset(root / "digits")
    log.info("demo assets: model %s, data %s", model, data)
    return {"model": model, "data": data}
