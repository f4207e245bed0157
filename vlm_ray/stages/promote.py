"""The promotion gate: move the champion pointer to a challenger only if it scores better.

Under the promotion root (``spec.promote.root``, default: the parent of run.uri):

    current.json                 the champion: {"run": <run URI>, "model_info": {...}, "score", ...}
    promotions/<UTC time>.json   every decision, promoted or kept: both scores, the spec, the time

The challenger's ``<run>/eval/metrics.json`` holds both models scored on the
challenger's held-out set: ``models.finetuned`` (the challenger) and
``models.champion`` (the current champion's model, run by the infer stage
under the tag "champion").
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from vlm_ray import layout
from vlm_ray.config import JobSpec, spec_to_dict
from vlm_ray.storage import Store, join_uri, open_store

log = logging.getLogger(__name__)

CURRENT = "current.json"
PROMOTIONS = "promotions"
CHALLENGER_TAG = "finetuned"
CHAMPION_TAG = "champion"


@dataclass(frozen=True)
class PromotionDecision:
    """What the gate decided, and why."""

    promote: bool
    reason: str
    metric: str
    margin: float
    challenger_score: float
    champion_score: float | None
    # With no champion yet: the base model's score on the same held-out set, when evaluated.
    base_score: float | None = None


def decide_promotion(
    metric: str,
    challenger: dict[str, Any],
    champion: dict[str, Any] | None,
    margin: float,
    base: dict[str, Any] | None = None,
) -> PromotionDecision:
    """Promote when the challenger beats the champion by `margin` on `metric`.

    With no champion yet, the base model stands in for it when it was evaluated on the same
    held-out set (infer.models has "base"): a first fine-tune that is no better than the model
    it started from is not promoted. Without base scores the first run promotes by default.
    """
    from vlm_ray.metrics import is_better

    if metric not in challenger:
        raise ValueError(
            f"challenger metrics have no {metric!r} (have: {sorted(challenger)}); "
            "set eval.metric to one the evaluate stage computes"
        )
    score = float(challenger[metric])
    if champion is None:
        if base is None or metric not in base:
            reason = (
                "no champion yet, and no base-model scores to compare with (infer.models has no "
                "'base'): the first run promotes by default"
            )
            return PromotionDecision(True, reason, metric, margin, score, None)
        floor = float(base[metric])
        beats = is_better(metric, score, floor, margin)
        reason = (
            f"no champion yet: challenger {metric} {score:.4f} "
            f"{'beats' if beats else 'does not beat'} the base model's {floor:.4f} by margin "
            f"{margin}"
        )
        return PromotionDecision(beats, reason, metric, margin, score, None, floor)
    if metric not in champion:
        raise ValueError(
            f"champion metrics have no {metric!r} (have: {sorted(champion)}); "
            "re-run evaluate on the champion's predictions"
        )
    best = float(champion[metric])
    if is_better(metric, score, best, margin):
        reason = f"challenger {metric} {score:.4f} beats champion {best:.4f} by margin {margin}"
        return PromotionDecision(True, reason, metric, margin, score, best)
    reason = f"challenger {metric} {score:.4f} does not beat champion {best:.4f} by margin {margin}"
    return PromotionDecision(False, reason, metric, margin, score, best)


def promotion_root(spec: JobSpec) -> str:
    """spec.promote.root, or the parent of run.uri (where sibling runs live)."""
    if spec.promote.root:
        return spec.promote.root
    parent = spec.run.uri.rstrip("/").rpartition("/")[0]
    if not parent or parent in ("s3:/", "file:/"):
        raise ValueError(
            f"run.uri {spec.run.uri!r} has no parent folder to keep current.json in: set promote.root"
        )
    return parent


def read_champion(root_store: Store) -> dict[str, Any] | None:
    """The current champion pointer, or None before the first promotion."""
    if not root_store.exists(CURRENT):
        return None
    return root_store.read_json(CURRENT)


def recorded_decision(root_store: Store, run_uri: str) -> dict[str, Any] | None:
    """The decision recorded for challenger run `run_uri` under the promotion root (with its
    record's URI as "record"), or None if none was made yet."""
    for key in sorted(root_store.list(PROMOTIONS)):
        if key.endswith(".json"):
            record = root_store.read_json(key)
            if record.get("challenger", {}).get("run") == run_uri:
                return {**record, "record": root_store.uri_of(key)}
    return None


def _record_decision(root_store: Store, record: dict[str, Any]) -> str:
    """Write promotions/<UTC time>.json create-only, so two decisions never overwrite each other."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    key = f"{PROMOTIONS}/{stamp}.json"
    data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    n = 1
    while not root_store.create_exclusive(key, data):
        key = f"{PROMOTIONS}/{stamp}-{n}.json"
        n += 1
    return key


def run_promote(spec: JobSpec, challenger_run: str, root: str) -> dict[str, Any]:
    """Gate the challenger run against root/current.json; record the decision; move the pointer if it wins."""
    start = time.time()
    endpoint = spec.run.s3_endpoint_url
    root_store = open_store(root, endpoint)
    run_store = open_store(challenger_run, endpoint)
    log.info("promote: start (challenger %s, root %s)", run_store.uri, root_store.uri)

    champion_ptr = read_champion(root_store)
    metrics = run_store.read_json(layout.EVAL_METRICS)
    models = metrics.get("models", {})
    if CHALLENGER_TAG not in models:
        raise ValueError(
            f"{run_store.uri_of(layout.EVAL_METRICS)} has no models.{CHALLENGER_TAG}: "
            "run infer and evaluate on the challenger first"
        )
    champion_metrics = None
    if champion_ptr is not None:
        if CHAMPION_TAG not in models:
            raise ValueError(
                f"{run_store.uri_of(layout.EVAL_METRICS)} has no models.{CHAMPION_TAG}, but "
                f"{root_store.uri_of(CURRENT)} names a champion ({champion_ptr.get('run')}): "
                "run infer with the champion's model on this run's held-out set, then evaluate"
            )
        champion_metrics = models[CHAMPION_TAG]
    if champion_ptr is not None and champion_ptr.get("run") == run_store.uri:
        raise ValueError(
            f"{run_store.uri} is already the champion: give the retraining run a new run.uri"
        )

    decision = decide_promotion(
        spec.eval.metric,
        models[CHALLENGER_TAG],
        champion_metrics,
        spec.promote.margin,
        base=models.get("base"),
    )
    # Another retraining may have moved the pointer while this one trained; comparing
    # against a stale champion would be wrong, so keep the champion and say why.
    if decision.promote and read_champion(root_store) != champion_ptr:
        decision = replace(
            decision,
            promote=False,
            reason="current.json changed while this run was evaluated; keeping the newer champion",
        )
    now = datetime.now(UTC).isoformat()
    record = {
        "time": now,
        "decision": "promoted" if decision.promote else "kept",
        **asdict(decision),
        "challenger": {"run": run_store.uri, "metrics": models[CHALLENGER_TAG]},
        "champion": None
        if champion_ptr is None
        else {"run": champion_ptr.get("run"), "metrics": champion_metrics},
        "heldout_rows": metrics.get("rows"),
        "eval_metrics": run_store.uri_of(layout.EVAL_METRICS),
        "spec": spec_to_dict(spec),
    }
    record_key = _record_decision(root_store, record)
    if decision.promote:
        pointer = {
            "run": run_store.uri,
            "model_info": run_store.read_json(layout.MODEL_INFO),
            "metric": decision.metric,
            "score": decision.challenger_score,
            "promoted_at": now,
            "decision": join_uri(root_store.uri, record_key),
            "previous": None if champion_ptr is None else champion_ptr.get("run"),
        }
        root_store.write_json(CURRENT, pointer)  # atomic: temp + rename locally, one PUT on S3
    result = {
        **record,
        "record": root_store.uri_of(record_key),
        "current": root_store.uri_of(CURRENT),
    }
    log.info(
        "promote: %s in %.1f s: %s; decision %s",
        record["decision"],
        time.time() - start,
        decision.reason,
        result["record"],
    )
    return result
