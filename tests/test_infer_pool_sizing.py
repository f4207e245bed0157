"""How many inference actors a pool starts and what share of a GPU each asks Ray for."""

from __future__ import annotations

import pytest

from vlm_ray.config import SpecError, parse_spec
from vlm_ray.infer.pool import actor_gpus, default_pool_size


def spec(**sections):
    raw = {"model": {"name": "m"}, "data": {"source": "d"}}
    raw.update(sections)
    return parse_spec(raw)


def test_by_default_each_gpu_holds_one_actor_and_a_cluster_without_gpus_runs_one_on_cpu():
    s = spec()
    assert (actor_gpus(s, gpus=4), default_pool_size(s, gpus=4)) == (1.0, 4)
    assert (actor_gpus(s, gpus=0), default_pool_size(s, gpus=0)) == (0, 1)


@pytest.mark.parametrize("copies", [2, 3, 7])
def test_actors_per_gpu_splits_each_gpu_between_that_many_model_copies(copies: int):
    s = spec(infer={"actors_per_gpu": copies})
    share = actor_gpus(s, gpus=2)
    assert default_pool_size(s, gpus=2) == 2 * copies
    # Ray keeps 4 decimals of a resource: the copies of one GPU must fit in it, not overflow it
    assert share == round(share, 4) and copies * share <= 1.0
    assert 1.0 - copies * share < 1e-3


def test_actors_per_gpu_divides_the_per_worker_gpus_and_an_explicit_pool_size_wins():
    s = spec(infer={"actors_per_gpu": 2}, ray={"num_gpus_per_worker": 2.0})
    assert (actor_gpus(s, gpus=4), default_pool_size(s, gpus=4)) == (1.0, 4)
    s = spec(infer={"actors_per_gpu": 2}, ray={"pool_size": 3})
    assert default_pool_size(s, gpus=4) == 3


def test_run_15_s_way_of_sharing_a_gpu_still_sizes_the_pool_as_measured():
    # inference run 15 ran three actors with ray.num_gpus_per_worker: 0.33
    s = spec(ray={"num_gpus_per_worker": 0.33})
    assert (actor_gpus(s, gpus=1), default_pool_size(s, gpus=1)) == (0.33, 3)


def test_a_copy_count_out_of_range_is_refused_naming_the_field():
    with pytest.raises(SpecError, match=r"infer\.actors_per_gpu"):
        spec(infer={"actors_per_gpu": 0})


def test_a_share_of_more_than_one_gpu_that_is_not_whole_is_refused_naming_both_fields():
    # Ray would refuse num_gpus=1.5 only when the first actor starts
    with pytest.raises(SpecError, match=r"infer\.actors_per_gpu: 2 .* ray\.num_gpus_per_worker: 3"):
        spec(infer={"actors_per_gpu": 2}, ray={"num_gpus_per_worker": 3.0})
    assert actor_gpus(spec(infer={"actors_per_gpu": 2}, ray={"num_gpus_per_worker": 4.0}), 8) == 2
