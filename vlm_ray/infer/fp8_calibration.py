"""The float8 input scales of infer.fp8_scaling: static, calibrated once per predictions folder.

Static scales come from data, so they are an artefact of the run, kept beside the predictions
they made: predictions/<model>/fp8_input_scales.json, committed with a create-only write before
any shard is predicted with them. Every actor of the pool and every later attempt (a restarted
actor, a resumed job) reads that file, so a row gets the same prediction whichever actor or
attempt made it. When two actors calibrate at once, the first commit wins and the other uses
the winner's scales.

The calibration rows are the first infer.fp8_calibration_rows rows of the first input shard:
the same rows on every attempt, known without reading the whole input.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from vlm_ray.models.fp8_linear import Fp8Scope, fp8_target_linears
from vlm_ray.models.fp8_static_linear import (
    convert_linears_to_static_fp8,
    record_input_amax,
    static_input_scales,
)
from vlm_ray.storage import Store

log = logging.getLogger(__name__)

SCALES_FILE = "fp8_input_scales.json"


@dataclass(frozen=True)
class Fp8Calibration:
    """Where a predictions folder's static float8 scales live, and what calibrates them."""

    store: Store
    scales_key: str  # predictions/<model>/fp8_input_scales.json
    input_key: str | None  # the input shard whose first rows calibrate; None: no input rows
    rows: int  # infer.fp8_calibration_rows
    fingerprint: str  # the predictions folder's: scales made for other settings are refused


def calibration_input_amax(
    model: Any, processor: Any, rows: list[dict[str, Any]], names: list[str], batch_size: int
) -> dict[str, float]:
    """The largest |input| of each named linear layer over the rows' prompts (one forward each,
    in batches, as generation's prefill sees them); rows whose image does not decode are skipped."""
    import torch

    from vlm_ray.infer.generation import (
        DecodeError,
        prepare_inputs,
        processor_device,
        prompt_messages,
        size_batches,
        size_key,
        try_decode_image,
    )

    decoded = [(row, try_decode_image(row["image"])) for row in rows]
    usable = [(row, img) for row, img in decoded if not isinstance(img, DecodeError)]
    if not usable:
        raise ValueError(f"none of the {len(rows)} calibration rows has an image that decodes")
    device = processor_device(model, processor)
    # Batched as generation batches them: images of one size together.
    keys = [size_key(row) for row, _ in usable]
    with record_input_amax(model, names) as amax, torch.inference_mode():
        for indices in size_batches(keys, batch_size):
            batch = [usable[i] for i in indices]
            inputs = prepare_inputs(
                processor, [img for _, img in batch], [prompt_messages(r) for r, _ in batch], device
            ).to(model.device)
            # Only the last position's logits: the vocabulary projection is not calibrated.
            model(**inputs, logits_to_keep=1)
        found = {name: value.item() for name, value in amax.items()}
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(
            f"calibration never reached {len(missing)} float8 layers (e.g. {missing[0]}); "
            "infer.fp8_scaling: static needs every layer to see input"
        )
    return found


def calibrated_input_scales(
    model: Any, processor: Any, names: list[str], calibration: Fp8Calibration, batch_size: int
) -> dict[str, float]:
    """The folder's committed scales, or new ones calibrated, committed and returned."""
    from vlm_ray.data.shards import read_shard

    store, key = calibration.store, calibration.scales_key
    if store.exists(key):
        return _read_scales(store, key, names, calibration.fingerprint)
    if calibration.input_key is None:
        raise ValueError(
            "infer.fp8_scaling: static calibrates on the input's first rows, and this input "
            "has no rows that prepare accepted"
        )
    start = time.time()
    rows = read_shard(store, calibration.input_key).slice(0, calibration.rows).to_pylist()
    amax = calibration_input_amax(model, processor, rows, names, batch_size)
    scales = static_input_scales(amax)
    payload = {
        "fingerprint": calibration.fingerprint,
        "calibrated_on": {"input_key": calibration.input_key, "rows": len(rows)},
        "format": "input float8 e4m3 scale per linear layer: x_fp8 = clamp(x / scale, +-448)",
        "layers": {n: {"input_amax": amax[n], "input_scale": scales[n]} for n in sorted(scales)},
    }
    committed, ours = commit_or_read(store, key, payload)
    if not ours:
        log.info("infer.fp8_scaling=static: another actor committed its scales first; using them")
        return _checked_scales(committed, store.uri_of(key), names, calibration.fingerprint)
    log.info(
        "infer.fp8_scaling=static: %d layers calibrated on %d rows of %s in %.1f s -> %s",
        len(scales),
        len(rows),
        calibration.input_key,
        time.time() - start,
        store.uri_of(key),
    )
    return scales


def commit_or_read(store: Store, key: str, payload: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create `key` holding `payload` unless it exists (a create-only write: of racing writers
    exactly one wins); returns what the key then holds, and whether it is this payload."""
    if store.create_exclusive(key, json.dumps(payload, indent=1).encode()):
        return payload, True
    return store.read_json(key), False


def _read_scales(store: Store, key: str, names: list[str], fingerprint: str) -> dict[str, float]:
    scales = _checked_scales(store.read_json(key), store.uri_of(key), names, fingerprint)
    log.info(
        "infer.fp8_scaling=static: %d layer scales read from %s", len(scales), store.uri_of(key)
    )
    return scales


def _checked_scales(
    payload: dict[str, Any], where: str, names: list[str], fingerprint: str
) -> dict[str, float]:
    """The per-layer input scales of a scales file, refused when made for other settings."""
    if payload.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{where} holds float8 scales calibrated for other predictions settings; delete it "
            "(and the predictions beside it) to calibrate again, or use a new run.uri"
        )
    layers = payload.get("layers", {})
    if set(layers) != set(names):
        raise ValueError(
            f"{where} has scales for {len(layers)} layers, and this model has {len(names)} "
            "float8 layers under the same settings; delete it to calibrate again"
        )
    return {name: float(layer["input_scale"]) for name, layer in layers.items()}


def quantize_linears_static(
    model: Any, processor: Any, scope: Fp8Scope, calibration: Fp8Calibration, batch_size: int
) -> int:
    """infer.fp8 with static scales: the scope's linear layers as Float8StaticLinear, each with
    the folder's calibrated input scale; returns how many."""
    names = fp8_target_linears(model, scope)
    if not names:
        log.warning("infer.fp8=%s: no linear layer of this model qualifies; left in bf16", scope)
        return 0
    scales = calibrated_input_scales(model, processor, names, calibration, batch_size)
    return convert_linears_to_static_fp8(model, scales)
