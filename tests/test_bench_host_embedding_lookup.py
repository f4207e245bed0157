"""bench/host_embedding_lookup.py prices where the input embedding is looked up; on CPU it times
the loader worker's lookup and says the GPU rows need CUDA."""

from __future__ import annotations

import json

from bench.host_embedding_lookup import main


def test_on_cpu_the_worker_lookup_is_timed_and_the_gpu_rows_say_they_need_cuda(tmp_path):
    out = tmp_path / "rows.jsonl"
    argv = ["--device", "cpu", "--vocab", "1000", "--hidden", "64", "--tokens", "20"]

    rows = main([*argv, "--iters", "3", "--out", str(out)])

    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert [r["row"] for r in rows] == [
        "worker lookup",
        "pinned rows to GPU",
        "GPU lookup",
        "offload on the loop",
    ]
    worker = rows[0]
    assert worker["ms"] > 0 and worker["ids"] == 4 * 20 and worker["rows_mb"] == 0.01
    assert all(r["error"] == "needs a CUDA device" for r in rows[1:])
