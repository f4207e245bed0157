"""Failures an operator fixes outside the code get one sentence naming the fix, also when a Ray
task raised them; anything else gets None (and keeps its traceback)."""

from __future__ import annotations

import pytest
from botocore.exceptions import EndpointConnectionError

from vlm_ray.operator_errors import RunConflictError, operator_message
from vlm_ray.stages.infer import MixedPredictionsError


def test_a_conflict_raised_in_a_ray_task_reaches_the_driver_as_its_own_sentence(ray_cluster):
    import ray

    @ray.remote
    def prepare_into_a_used_folder():
        raise MixedPredictionsError("predictions/base holds predictions made with another model")

    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(prepare_into_a_used_folder.remote())

    assert operator_message(raised.value) == (
        "predictions/base holds predictions made with another model"
    )


def test_an_unreachable_endpoint_is_named_by_its_scheme_and_host_only():
    err = EndpointConnectionError(endpoint_url="http://10.0.0.7:9000/bucket/runs/r1/spec.yaml")

    message = operator_message(err)

    assert message is not None
    assert message.startswith("cannot reach the S3 endpoint http://10.0.0.7:9000: check")


def test_a_conflict_is_recognised_through_the_exception_chain():
    try:
        try:
            raise RunConflictError("bulk/nov/input was prepared with different data settings")
        except RunConflictError as inner:
            raise RuntimeError("infer failed") from inner
    except RuntimeError as outer:
        assert operator_message(outer) == "bulk/nov/input was prepared with different data settings"


def test_other_failures_keep_their_traceback():
    assert operator_message(ZeroDivisionError("division by zero")) is None
    assert operator_message(RuntimeError("CUDA error: an illegal memory access")) is None


def test_asking_the_cluster_for_what_it_cannot_give_is_one_sentence():
    from vlm_ray.infer.pool import UnhostableActorError
    from vlm_ray.train.engine import EngineUnavailableError

    for err in (
        EngineUnavailableError(
            "train.engine=unsloth needs a CUDA GPU, and this Ray cluster has none"
        ),
        UnhostableActorError("ray.num_cpus_per_worker=64 (with num_gpus=0) fits on no node"),
    ):
        assert operator_message(err) == str(err)


def test_a_gpu_out_of_memory_in_an_actor_names_the_settings_that_lower_it(ray_cluster):
    import ray
    import torch

    @ray.remote
    class Generator:
        def generate(self):
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                "79.19 GiB of which 1.02 GiB is free.\nIncluding non-PyTorch memory, ..."
            )

    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(Generator.remote().generate.remote())

    message = operator_message(raised.value)
    assert message is not None
    assert message.startswith("a GPU ran out of memory (CUDA out of memory. Tried to allocate")
    assert "Including non-PyTorch" not in message  # one line of torch's text, not all of it
    for field in ("generation.batch_size", "infer.actors_per_gpu"):
        assert field in message
