"""The inference benchmark's pool mode (c) runs end to end on the CPU with the tiny shape, as
the device chains run it at 2B: two actors per (logical) GPU through infer.actors_per_gpu, every
image predicted, each actor's rate, memory peak and GPU sharing in the result. Device time is
scarce; a bench that breaks after its arguments parse costs a whole chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the device chains' pool line (bench/chains/infer_2b_two_actors_mps.txt), at the tiny shape
POOL_ARGS = (
    "--shape tiny --modes c --engine hf --batch 8 --rows-per-shard 8 --images-c 32 "
    "--actors-per-gpu 2 --cpus-per-actor 1"
)


def test_pool_mode_with_two_actors_per_gpu_predicts_every_image_and_reports_each_actor(
    tmp_path: Path,
):
    out = tmp_path / "infer_tiny.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            "bench/infer_speed.py",
            *POOL_ARGS.split(),
            *("--out", str(out)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert run.returncode == 0 and out.exists(), run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text().splitlines()[-1])

    assert (result["mode"], result["images"], result["errors"]) == ("c", 32, 0)
    assert (result["actors_per_gpu"], result["actors"]) == (2, 2)  # one logical GPU, two copies
    assert result["shards"] == 4 and result["images_per_s"] > 0
    assert len(result["images_per_s_by_actor"]) == 2
    # no CUDA here: neither a memory peak nor a way of sharing a GPU is claimed
    assert set(result["gpu_peak_gib_by_actor"].values()) == {None}
    assert set(result["gpu_sharing_by_actor"].values()) == {None}
    assert result["gpu"] == "cpu"
