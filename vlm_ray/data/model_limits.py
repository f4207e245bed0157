"""What the model imposes on prepared data: image geometry (from its family) and a token counter.

Read once on the driver from the model folder (local, s3://, or the hub when
reachable). When the model cannot be read — a hub id on an offline machine —
prepare falls back to the spec's values and a patch multiple of 28, and says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from vlm_ray.config import JobSpec, SpecError
from vlm_ray.data.images import ImageRules
from vlm_ray.models.families import family_by_name
from vlm_ray.storage import is_s3, open_store

log = logging.getLogger(__name__)

DEFAULT_PATCH_MULTIPLE = 28
DEFAULT_MAX_ASPECT_RATIO = 200.0


@dataclass(frozen=True)
class ModelLimits:
    """Image rules plus the model's tokenizer (tokenizer.json text) for the target-length check."""

    image_rules: ImageRules
    family: str | None
    tokenizer_json: str | None
    max_seq_length: int


def model_limits(spec: JobSpec) -> ModelLimits:
    """Image rules and tokenizer for spec.model.name, falling back to the spec / 28 px when unreadable."""
    config = _model_file(spec, "config.json")
    family = None
    if config is not None:
        try:
            family = family_by_name(json.loads(config)["model_type"])
        except (ValueError, KeyError) as err:
            log.warning("prepare: %s; image geometry falls back to the spec's values", err)
    else:
        log.warning(
            "prepare: cannot read %s/config.json; patch multiple falls back to %d",
            spec.model.name,
            DEFAULT_PATCH_MULTIPLE,
        )
    if family is not None and not family.system_prompt_with_images and spec.data.system_prompt:
        # The chat template raises on it; refuse here, before any row is read, not when training starts.
        raise SpecError(
            f"data.system_prompt is set, but {family.title}'s chat template ({spec.model.name}) "
            "refuses a system turn next to an image; remove data.system_prompt "
            "(put its text into data.prompt instead)"
        )
    d = spec.data
    rules = ImageRules(
        min_size=d.image_min_size,
        max_size=d.image_max_size,
        patch_multiple=family.patch_multiple if family else DEFAULT_PATCH_MULTIPLE,
        max_aspect_ratio=d.max_aspect_ratio
        or (family.max_aspect_ratio if family else DEFAULT_MAX_ASPECT_RATIO),
        max_image_pixels=d.max_image_pixels,
        min_side=d.min_image_side,
        image_format=d.image_format,
    )
    # One unreachable hub lookup is enough (each retries for a while).
    tokenizer = _model_file(spec, "tokenizer.json") if config is not None else None
    if tokenizer is None:
        log.warning(
            "prepare: no tokenizer.json for %s; target length is bounded by bytes instead of tokens",
            spec.model.name,
        )
    return ModelLimits(rules, family.name if family else None, tokenizer, spec.model.max_seq_length)


def _model_file(spec: JobSpec, name: str) -> str | None:
    """A small text file of the model: from a local folder, object storage, or the hub (None when unreachable)."""
    model = spec.model.name
    try:
        if is_s3(model):
            return open_store(model, spec.run.s3_endpoint_url).read_text(name)
        local = Path(model.removeprefix("file://"))
        if local.is_dir():
            path = local / name
            return path.read_text() if path.is_file() else None
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, name)).read_text()
    except Exception as err:  # offline, gated, missing file: fall back, never fail prepare over it
        log.debug("prepare: %s of %s unavailable: %s", name, model, err)
        return None


@lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def count_tokens(limits: ModelLimits, text: str) -> tuple[int, str]:
    """Tokens in text by the model's tokenizer, or a lower bound (UTF-8 bytes / 16) without one; and the unit."""
    if limits.tokenizer_json:
        return len(
            _tokenizer(limits.tokenizer_json).encode(text, add_special_tokens=False)
        ), "tokens"
    # No BPE token of a real vocabulary is longer than ~16 bytes, so this never over-counts.
    return len(text.encode("utf-8")) // 16, "tokens at least"
