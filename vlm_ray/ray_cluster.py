"""Joining or starting the Ray cluster a stage runs on."""

from __future__ import annotations

import logging
import os
import warnings

import ray

from vlm_ray.config import RaySpec

log = logging.getLogger(__name__)


def init_ray(spec: RaySpec) -> None:
    """Connect to spec.address (or start a local cluster); a no-op when already connected."""
    if ray.is_initialized():
        return
    address = spec.address or os.environ.get("RAY_ADDRESS")
    # The project's code travels with the job (ray job submit --working-dir);
    # for a local cluster the workers import it from the same environment.
    ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    res = ray.cluster_resources()
    log.info(
        "ray: connected to %s (CPUs %s, GPUs %s)",
        address or "a new local cluster",
        res.get("CPU", 0),
        res.get("GPU", 0),
    )


def cluster_gpus() -> int:
    """Whole GPUs in the cluster."""
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    """CPUs in the cluster."""
    return int(ray.cluster_resources().get("CPU", 1))


def actor_was_restarted() -> bool:
    """Inside an actor: whether Ray restarted it after a failure (max_restarts)."""
    from ray.util.annotations import RayDeprecationWarning

    # Ray's own property reads its deprecated RuntimeContext.actor_id and warns on every actor
    # start; the warning is about Ray's code, not ours.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
