"""infer.actors_per_gpu on a real Ray cluster that has a GPU: the copies share it, and between
them every input row is predicted exactly once.

The cluster runs in its own process (the session's cluster has no GPUs) and declares one GPU as
a Ray resource: Ray schedules by resources, so two actors asking for half a GPU each run side by
side there, as on a GPU node; this machine has no CUDA device, so they generate on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_infer_loading import infer_spec
from test_infer_stage import _predictions

from vlm_ray.config import spec_to_dict
from vlm_ray.storage import LocalStore

DRIVER = """
import json, logging, sys
import ray
from vlm_ray.config import parse_spec
from vlm_ray.stages.infer import run_infer

logging.basicConfig(level=logging.INFO)
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
result = run_infer(parse_spec(json.loads(sys.argv[1])), models=["base"])["models"]["base"]
print("RESULT " + json.dumps(result))
"""


def test_two_copies_share_one_gpu_and_predict_every_row_once_between_them(
    write_prepared, tiny_qwen2_vl, tmp_path
):
    store = LocalStore(tmp_path / "store")
    recs = write_prepared(store, rows=2, heldout=8, rows_per_shard=2)
    spec = infer_spec(
        store.uri,
        tiny_qwen2_vl,
        infer={"actors_per_gpu": 2, "engine": "hf"},
        generation={"max_new_tokens": 2, "batch_size": 2},
    )

    out = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(spec_to_dict(spec))],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:])

    assert "4 shards on 2 actors (num_gpus=0.5 each" in out.stderr
    actors = result["actors"]
    assert len(actors) == 2 and all(a["shards"] >= 1 for a in actors.values()), actors
    assert all(a["gpu_peak_gib"] is None for a in actors.values()), "no CUDA device here"
    # nor a claim of how a GPU was shared (MPS or time-slicing) without one
    assert all(a["gpu_sharing"] is None for a in actors.values())
    predicted = [r["id"] for r in _predictions(store, "base")]
    assert sorted(predicted) == sorted(r["id"] for r in recs[2:])
