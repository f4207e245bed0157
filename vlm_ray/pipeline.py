"""prepare → train → infer → evaluate on one run URI; each stage skips work already committed."""

from __future__ import annotations

import logging
import time
from typing import Any

import yaml

from vlm_ray import layout
from vlm_ray.config import JobSpec, spec_to_dict
from vlm_ray.ray_cluster import init_ray
from vlm_ray.storage import open_store

log = logging.getLogger(__name__)


def run_pipeline(spec: JobSpec) -> dict[str, Any]:
    """Run every stage in order and print where the outputs are and the base vs fine-tuned table."""
    from vlm_ray.stages.evaluate import format_summary_table, run_evaluate
    from vlm_ray.stages.infer import run_infer
    from vlm_ray.stages.prepare import run_prepare
    from vlm_ray.stages.train import run_train

    init_ray(spec.ray)
    store = open_store(spec.run.uri, spec.run.s3_endpoint_url)
    # The run folder describes itself: the spec that made it sits at its root.
    store.write_text(layout.SPEC, yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    stages = [
        ("prepare", run_prepare),
        ("train", run_train),
        ("infer", run_infer),
        ("evaluate", run_evaluate),
    ]
    if spec.infer.source:
        # Bulk captioning of infer.source: those images have no references, so nothing to score.
        log.info(
            "pipeline: infer.source is set (%s): bulk captioning, evaluate skipped",
            spec.infer.source,
        )
        stages = stages[:3]
    for name, fn in stages:
        start = time.time()
        log.info("pipeline: %s ...", name)
        results[name] = fn(spec)
        timings[name] = round(time.time() - start, 1)
        log.info("pipeline: %s done in %.1f s", name, timings[name])
    results["timings_s"] = timings
    print()
    print(f"Run {store.uri}")
    print(f"  prepared data : {store.uri_of(layout.PREPARED)}/  (manifest.json, quarantine/)")
    print(f"  model         : {store.uri_of('model')}/")
    print(f"  predictions   : {results['infer']['predictions']}/")
    if "evaluate" in results:
        print(f"  report        : {store.uri_of(layout.EVAL_REPORT)}")
    print(f"  stage times   : {', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}")
    if "evaluate" in results:
        print()
        print(format_summary_table(results["evaluate"]))
    return results
