"""Prepare-stage throughput: images/s for 1..N Ray workers beside a bare single-process Pillow loop,
and the driver's peak RSS at 10k and 100k rows (flat memory).

    .venv/bin/python bench/prepare_throughput.py                       # defaults: 160 photos, 1..2 workers
    .venv/bin/python bench/prepare_throughput.py --rows 400 --workers 1,2,4,8 --rss-rows 10000,100000

The image set: mixed-size, real-looking JPEGs (2000x1500, 1600x1200, 1024x768,
800x600: gradients, noise and shapes), resized to the production default
300..1000 px and stored as PNG. The bare loop does the same per-image work
(read the file, `process_image`, write parquet shards) in one process, no Ray.
Prints a markdown table; nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault(
    "HF_HUB_OFFLINE", "1"
)  # the model is not needed: geometry falls back to 28 px
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SIZES = [(2000, 1500), (1600, 1200), (1024, 768), (800, 600)]
UNIQUE_IMAGES = 32


def make_images(folder: Path, unique: int = UNIQUE_IMAGES) -> list[str]:
    """Real-looking JPEGs of mixed sizes; returns their file names."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    names = []
    for i in range(unique):
        w, h = SIZES[i % len(SIZES)]
        if i % 3 == 2:
            w, h = h, w  # some portrait
        x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
        y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
        channels = (x * 200 + y * 40, y * 180 + 30 + 0 * x, (1 - x) * 150 + y * 60)
        base = np.stack(np.broadcast_arrays(*channels), axis=2)
        arr = np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w - 50)), int(rng.integers(0, h - 50))
            draw.ellipse(
                (x0, y0, x0 + int(rng.integers(20, w // 3)), y0 + int(rng.integers(20, h // 3))),
                fill=tuple(int(c) for c in rng.integers(0, 255, 3)),
            )
        name = f"img{i:03d}.jpg"
        img.save(folder / name, format="JPEG", quality=90)
        names.append(name)
    return names


def write_jsonl(folder: Path, names: list[str], rows: int) -> Path:
    path = folder / "data.jsonl"
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"image": names[i % len(names)], "text": f"caption {i}"}) + "\n")
    return path


def make_spec(
    run_uri: str, source: str, rows_per_shard: int, min_size: int = 300, max_size: int = 1000
):
    from vlm_ray.config import parse_spec

    return parse_spec(
        {
            "run": {"uri": run_uri},
            "model": {"name": "offline/not-needed"},
            "data": {
                "source": source,
                "image_min_size": min_size,
                "image_max_size": max_size,
                "rows_per_shard": rows_per_shard,
            },
        }
    )


def bare_loop(folder: Path, jsonl: Path, out: Path, rows_per_shard: int) -> float:
    """images/s of one process doing the same per-image work: read, process_image, write parquet shards."""
    from vlm_ray.data.images import ImageRules, process_image
    from vlm_ray.data.shards import write_shard
    from vlm_ray.storage import LocalStore

    store = LocalStore(out)
    rules = ImageRules()
    start = time.perf_counter()
    batch, n, shard = [], 0, 0
    for line in jsonl.open():
        rec = json.loads(line)
        image, w, h = process_image((folder / rec["image"]).read_bytes(), rules)
        batch.append(
            {
                "id": str(n),
                "source_id": str(n),
                "image": image,
                "width": w,
                "height": h,
                "prompt": "p",
                "system_prompt": None,
                "text": rec["text"],
                "messages": "[]",
            }
        )
        n += 1
        if len(batch) == rows_per_shard:
            write_shard(store, f"bare/shard-{shard:05d}.parquet", batch)
            batch, shard = [], shard + 1
    if batch:
        write_shard(store, f"bare/shard-{shard:05d}.parquet", batch)
    return n / (time.perf_counter() - start)


def _bare_worker(args: tuple[str, str, str, int]) -> int:
    folder, jsonl, out, rows_per_shard = args
    bare_loop(Path(folder), Path(jsonl), Path(out), rows_per_shard)
    return sum(1 for _ in open(jsonl))


def bare_parallel(
    processes: int, folder: Path, jsonl: Path, out: Path, rows_per_shard: int
) -> float:
    """images/s of `processes` bare loops side by side (no Ray): what this machine's cores allow."""
    import multiprocessing as mp

    jobs = [
        (str(folder), str(jsonl), str(out / f"bare{processes}-{i}"), rows_per_shard)
        for i in range(processes)
    ]
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(_bare_worker, jobs[:1] * processes)  # warm-up: imports in every process
        start = time.perf_counter()
        done = sum(pool.map(_bare_worker, jobs))
        return done / (time.perf_counter() - start)


def ray_run(workers: int, jsonl: Path, warm: Path, out: Path, rows_per_shard: int) -> float:
    """images/s of the prepare stage on a fresh local cluster of `workers` CPUs (after a warm-up run)."""
    import ray

    from vlm_ray.stages.prepare import run_prepare

    ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR")
    try:
        # warm-up: one-row shards, so every worker process starts and imports everything once
        run_prepare(make_spec(str(out / f"warm{workers}"), str(warm), 1))
        start = time.perf_counter()
        manifest = run_prepare(make_spec(str(out / f"ray{workers}"), str(jsonl), rows_per_shard))
        elapsed = time.perf_counter() - start
    finally:
        ray.shutdown()
    assert manifest["rows_quarantined"] == 0
    return manifest["rows_ok"] / elapsed


def rss_child(rows: int) -> None:
    """Run prepare over `rows` rows of small images; print the driver's peak RSS (MiB) as JSON."""
    import threading

    import psutil
    import ray
    from PIL import Image

    from vlm_ray.stages.prepare import run_prepare

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = []
        for i in range(8):
            Image.new("RGB", (32 + 4 * i, 32), (20 * i, 100, 200)).save(folder / f"s{i}.png")
            names.append(f"s{i}.png")
        jsonl = write_jsonl(folder, names, rows)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        proc = psutil.Process()
        before = proc.memory_info().rss / 2**20
        peak = [before]
        running = threading.Event()
        running.set()

        def sample() -> None:  # the driver's resident memory, every 20 ms
            while running.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        manifest = run_prepare(make_spec(str(folder / "run"), str(jsonl), 1000, 28, 56))
        elapsed = time.perf_counter() - start
        running.clear()
        sampler.join()
        ray.shutdown()
        peak = peak[0]
    print(
        json.dumps(
            {
                "rows": manifest["rows_ok"],
                "peak_mib": round(peak, 1),
                "before_mib": round(before, 1),
                "seconds": round(elapsed, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=160, help="images in the throughput set")
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    parser.add_argument("--rows-per-shard", type=int, default=20)
    parser.add_argument(
        "--rss-rows", default="10000,100000", help="row counts for the driver-RSS runs ('' to skip)"
    )
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return

    import logging

    logging.basicConfig(level=logging.WARNING)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {_cpu_model()}; python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        names = make_images(folder)
        jsonl = write_jsonl(folder, names, args.rows)
        warm = folder / "warm"
        warm.mkdir()
        for n in names[:4]:
            os.link(folder / n, warm / n)
        warm_jsonl = write_jsonl(warm, names[:4], 16)
        print(
            f"made {len(names)} unique JPEGs, {args.rows} rows in {time.perf_counter() - t:.0f} s"
        )

        bare = bare_loop(folder, jsonl, folder / "out", args.rows_per_shard)
        print("\n| setup | images/s | vs 1 | per worker vs bare loop |\n|---|---|---|---|")
        print(f"| bare Pillow loop, 1 process | {bare:.1f} | 1.00x | 1.00 |", flush=True)
        one = None
        for w in [int(x) for x in args.workers.split(",") if x]:
            if w > 1:  # the control: how far do plain processes scale on this machine right now?
                par = bare_parallel(w, folder, jsonl, folder / "out", args.rows_per_shard)
                print(
                    f"| bare loops, {w} processes side by side | {par:.1f} | {par / bare:.2f}x | {par / w / bare:.2f} |"
                )
            ips = ray_run(w, jsonl, warm_jsonl, folder / "out", args.rows_per_shard)
            one = one or ips
            print(
                f"| prepare on Ray, {w} worker(s) | {ips:.1f} | {ips / one:.2f}x (target {0.8 * w:.1f}x) "
                f"| {ips / w / bare:.2f} (target 0.90) |",
                flush=True,
            )

    sizes = [int(x) for x in args.rss_rows.split(",") if x]
    if sizes:
        print(
            "\n| rows | driver RSS after ray.init (MiB) | driver peak RSS during prepare (MiB) | prepare time (s) |\n|---|---|---|---|"
        )
    for rows in sizes:
        out = (
            subprocess.run(
                [sys.executable, __file__, "--rss-child", str(rows)],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        r = json.loads(out)
        print(f"| {r['rows']} | {r['before_mib']} | {r['peak_mib']} | {r['seconds']} |", flush=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
