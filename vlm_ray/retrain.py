"""Scheduled retraining: prepare the new data → train a challenger → score it and the current
champion on the challenger's held-out set → promote only if it wins (vlm_ray.stages.promote).

`vlm-ray retrain --config job.yaml run.uri=<new run>` / `python -m jobs.retrain ...`. Each
retraining is its own run under run.uri; the champion pointer and the decisions live under
the promotion root (promote.root, default: the parent of run.uri). Resubmitting the same run
resumes it, and once it has been decided it returns that decision instead of deciding twice.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import yaml

from vlm_ray import layout
from vlm_ray.config import JobSpec, spec_to_dict
from vlm_ray.ray_cluster import init_ray
from vlm_ray.stages.promote import (
    CHAMPION_TAG,
    promotion_root,
    read_champion,
    recorded_decision,
    run_promote,
)
from vlm_ray.storage import open_store

log = logging.getLogger(__name__)


def _infer_champion(spec: JobSpec, champion_run: str) -> dict[str, Any]:
    """Predict this run's held-out set with the champion's model, under the tag "champion"."""
    from vlm_ray.stages.infer import run_infer

    if "model_runs" not in inspect.signature(run_infer).parameters:
        raise NotImplementedError(
            "vlm_ray.stages.infer.run_infer has no model_runs parameter: retraining needs "
            "run_infer(spec, models=['champion'], model_runs={'champion': <champion run URI>}) "
            "to load <champion run>/model/model_info.json like 'finetuned' loads this run's model"
        )
    return run_infer(spec, models=[CHAMPION_TAG], model_runs={CHAMPION_TAG: champion_run})


def run_retrain(spec: JobSpec) -> dict[str, Any]:
    """Train a challenger on the new data and promote it only if it beats the champion."""
    from vlm_ray.stages.evaluate import run_evaluate
    from vlm_ray.stages.infer import run_infer
    from vlm_ray.stages.prepare import run_prepare
    from vlm_ray.stages.train import run_train

    start = time.time()
    root = promotion_root(spec)
    endpoint = spec.run.s3_endpoint_url
    run_store = open_store(spec.run.uri, endpoint)
    root_store = open_store(root, endpoint)
    log.info("retrain: start (challenger run %s, promotion root %s)", run_store.uri, root_store.uri)

    earlier = recorded_decision(root_store, run_store.uri)
    if earlier is not None:
        log.info(
            "retrain: %s was already decided (%s, %s); nothing to do",
            run_store.uri,
            earlier["decision"],
            earlier["record"],
        )
        return earlier

    init_ray(spec.ray)
    run_store.write_text(layout.SPEC, yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    champion = read_champion(root_store)
    log.info(
        "retrain: champion %s",
        "none yet (this run is promoted if it completes)"
        if champion is None
        else f"{champion['run']} ({champion.get('metric')} {champion.get('score')})",
    )
    timings: dict[str, float] = {}

    def stage(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        out = fn(*args, **kwargs)
        timings[name] = round(time.time() - t0, 1)
        log.info("retrain: %s done in %.1f s", name, timings[name])
        return out

    stage("prepare", run_prepare, spec)
    stage("train", run_train, spec)
    stage("infer", run_infer, spec)
    if champion is not None:
        stage("infer champion", _infer_champion, spec, champion["run"])
    stage("evaluate", run_evaluate, spec)
    result = stage("promote", run_promote, spec, run_store.uri, root_store.uri)
    result["timings_s"] = timings
    others = [("champion", result["champion_score"]), ("base model", result.get("base_score"))]
    print()
    print(f"Retraining run {run_store.uri}: {result['decision'].upper()}")
    print(f"  {result['reason']}")
    print(
        f"  {result['metric']}: challenger {result['challenger_score']:.4f}"
        + "".join(f", {name} {score:.4f}" for name, score in others if score is not None)
    )
    no_champion = result["decision"] == "kept" and result.get("champion") is None
    print(f"  champion pointer : {result['current']}" + (" (none yet)" if no_champion else ""))
    print(f"  decision record  : {result['record']}")
    log.info("retrain: %s in %.1f s", result["decision"], time.time() - start)
    return result
