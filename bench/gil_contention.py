"""How fast one thread launches torch ops while another thread prepares the next batch.

An infer actor generates in one thread and prepares the next batch in another
(generation.predict_table). Every torch op gives up the GIL while it runs and takes it back to
return; beside a thread busy in Python that wait lasts up to Python's switch interval (5 ms by
default). Inference run 14's profile found the GPU idle ~30% of predict_table's wall time
against ~10% for generation alone; this measures the mechanism on the CPU, where it is the same.

Rows, each at every --intervals value (ms):
  alone       the launching thread by itself: a loop of small in-place torch ops;
  busy        beside a thread running a pure Python loop (the worst case);
  processor   beside a thread running the real preparation, prepare_inputs (chat template,
              tokenizer, Qwen2-VL image processor) of the tiny model on --images images.
For each: the launcher's ops/s and its ratio to `alone`, and for `processor` also the preparing
thread's batches/s (a shorter interval shares the GIL more evenly, so it may prepare slower).

    python bench/gil_contention.py --out bench/results/gil_contention.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def launch_rate(seconds: float) -> float:
    """Small in-place torch ops per second from this thread over `seconds` of wall time."""
    import torch

    x = torch.zeros(4)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            x.add_(1)
        n += 20
    return n / (time.perf_counter() - start)


def beside(work, seconds: float) -> tuple[float, int]:
    """The launch rate while `work(stop)` runs in another thread; and how many units it finished."""
    stop = threading.Event()
    done = [0]

    def run():
        while not stop.is_set():
            work()
            done[0] += 1

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.05)  # let it get going
    rate = launch_rate(seconds)
    stop.set()
    t.join()
    return rate, done[0]


def busy_python() -> None:
    s = 0
    for i in range(20_000):
        s += i


def processor_work(n_images: int):
    """One batch of the real preparation: the tiny Qwen2-VL's processor over 448 px images."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from vlm_ray.infer.generation import prepare_inputs
    from vlm_ray.models.tiny import build_tiny_model

    folder = build_tiny_model(Path(tempfile.gettempdir()) / "vlm_ray_gil_bench_model")
    processor = AutoProcessor.from_pretrained(folder)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8))
        for _ in range(n_images)
    ]
    messages = [
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": f"Read number {k}."}],
            }
        ]
        for k in range(n_images)
    ]
    return lambda: prepare_inputs(processor, images, messages)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--intervals", default="5,0.5,0.1", help="switch intervals to try, ms")
    p.add_argument("--seconds", type=float, default=3.0, help="timed window per row")
    p.add_argument("--images", type=int, default=32, help="images per prepared batch")
    p.add_argument("--out", type=Path, help="append one JSON line per row here")
    a = p.parse_args()

    import torch

    # One intra-op thread: on a 2-core machine the processor's own thread pool would otherwise
    # compete with the launcher for cores, which is not what this measures.
    torch.set_num_threads(1)
    prepare = processor_work(a.images)
    prepare()  # warm: the first call compiles the chat template
    times = []
    for _ in range(3):
        start = time.perf_counter()
        prepare()
        times.append(time.perf_counter() - start)
    batch_s = sorted(times)[1]  # the median of three
    print(f"one prepared batch of {a.images} images alone: {batch_s * 1000:.0f} ms")
    rows = []
    for ms in (float(v) for v in a.intervals.split(",")):
        sys.setswitchinterval(ms / 1000)
        alone = launch_rate(a.seconds)
        busy, _ = beside(busy_python, a.seconds)
        proc, batches = beside(prepare, a.seconds)
        row = {
            "switch_interval_ms": ms,
            "alone_ops_per_s": round(alone),
            "beside_busy_python_ops_per_s": round(busy),
            "beside_busy_python_x": round(busy / alone, 4),
            "beside_processor_ops_per_s": round(proc),
            "beside_processor_x": round(proc / alone, 4),
            "processor_batches_per_s": round(batches / a.seconds, 3),
            "processor_batches_per_s_alone": round(1 / batch_s, 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    sys.setswitchinterval(0.005)
    meta = {
        "images": a.images,
        "seconds": a.seconds,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "date": date.today().isoformat(),
    }
    if a.out:
        with a.out.open("a") as f:
            for row in rows:
                f.write(json.dumps({**meta, **row}) + "\n")


if __name__ == "__main__":
    main()
