"""The demo's data: scikit-learn's 1,797 real handwritten digits, rendered as images with the digit as text.

The digits ship inside scikit-learn (no network). Each 8x8, 17-level scan is
drawn as dark ink on white and written as a PNG next to a JSONL file, the
layout a user's own OCR data would have; the prepare stage reads it like any
other JSONL source.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_PROMPT = "Which digit is written in this image? Answer with the digit only."


def render_digit(pixels_8x8: np.ndarray, scale: int = 7) -> Image.Image:
    """Dark ink on white, upscaled with nearest-neighbour so the scan's pixels stay crisp."""
    ink = np.clip(pixels_8x8 / 16.0, 0.0, 1.0)
    gray = (255 * (1.0 - ink)).astype(np.uint8)
    img = Image.fromarray(gray, mode="L").convert("RGB")
    return img.resize((8 * scale, 8 * scale), Image.Resampling.NEAREST)


def write_digits_dataset(out_dir: str | Path, limit: int | None = None, scale: int = 7) -> Path:
    """Write images/NNNN.png and digits.jsonl ({"image", "text", "id"}); returns the JSONL path."""
    from sklearn.datasets import load_digits

    out = Path(out_dir)
    jsonl = out / "digits.jsonl"
    digits = load_digits()
    n = len(digits.target) if limit is None else min(limit, len(digits.target))
    if jsonl.exists() and sum(1 for _ in jsonl.open()) == n:
        return jsonl  # already written by an earlier run
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"images/{i:04d}.png"
        render_digit(digits.images[i], scale).save(out / name, optimize=False)
        lines.append(
            json.dumps({"id": f"digit-{i:04d}", "image": name, "text": str(int(digits.target[i]))})
        )
    tmp = jsonl.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(jsonl)
    return jsonl
