"""Inference speed: the notebook way vs plain HF batched generate vs our actor pool, same GPU and model.

Run on the GPU machine (each mode in its own process; results appended to --out as JSON lines):

    PYTHONUNBUFFERED=1 python bench/infer_speed.py --shape 2b --out $OUT/infer_2b.jsonl
    PYTHONUNBUFFERED=1 python bench/infer_speed.py --shape tiny --out $OUT/infer_tiny.jsonl
    PYTHONUNBUFFERED=1 python bench/infer_speed.py --shape 2b --modes c --gpus 2   # (d), 2 GPUs

The model is a random-weight Qwen2-VL at the real shape (vlm_ray.models.tiny SHAPES), built on
the GPU in bf16 under /tmp with its embeddings padded to the real vocabulary, as
bench/train_speed.py does. Its generation_config forces min_new_tokens = max_new_tokens = 32,
so every setup generates exactly 32 tokens per image. Images: 448x448 PNGs (256 image tokens).

  a  one image at a time: processor + model.generate, batch 1 (the notebook way)
  b  plain HF batched generate (left padding) at each of --batch-sizes; per batch the time in the
     processor, in prefill (max_new_tokens=1) and the rest (decode) is measured apart
  c  our stage: vlm_ray.stages.infer.run_infer on a local Ray cluster, pool of --gpus actors
     (num_gpus=1 each), reading prepared parquet shards, writing predictions; engine auto
     (Unsloth when importable) unless --engine hf
  s  where our stage's time goes, without Ray: its loading and generation code on one batch of
     --batch, timed per phase (processor, vision tower, prefill, decode) and profiled
  p  plain HF under torch.profiler, and a static KV cache attempt

BENCH_CACHE=static sets generation.cache_implementation for modes c and s,
BENCH_COMPILE_VISION=1 sets infer.compile_vision, BENCH_COMPILE_LANGUAGE=1 infer.compile_language,
BENCH_FP8=vision|all sets infer.fp8 (mode s then also measures how close the float8 model's
first-token logits stay to bf16's), BENCH_FP8_SCALING=row|tensor|static infer.fp8_scaling, and
BENCH_VISION_ATTENTION=cudnn infer.vision_attention, BENCH_DEFER_STOP=1 infer.defer_stop_check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
REAL_VOCAB = {"2b": 151936, "7b": 152064}
PROMPT = "Read the number in this image."
NEW_TOKENS = 32
CACHE = os.environ.get("BENCH_CACHE") or None  # generation.cache_implementation in modes c and s
COMPILE_VISION = os.environ.get("BENCH_COMPILE_VISION") == "1"  # infer.compile_vision in c and s
FP8 = os.environ.get("BENCH_FP8") or "off"  # infer.fp8 in c and s
COMPILE_LANGUAGE = os.environ.get("BENCH_COMPILE_LANGUAGE") == "1"  # infer.compile_language
FP8_SCALING = os.environ.get("BENCH_FP8_SCALING") or "row"  # infer.fp8_scaling
VISION_ATTENTION = os.environ.get("BENCH_VISION_ATTENTION") or "auto"  # infer.vision_attention
# mode s only: "default" runs the processor on generation's stream (generation.SIDE_STREAM off),
# the A/B of the processor's own stream; the pool (mode c) always uses its own stream.
PREPROCESS_STREAM = os.environ.get("BENCH_PREPROCESS_STREAM") or "side"
DEFER_STOP = os.environ.get("BENCH_DEFER_STOP") == "1"  # infer.defer_stop_check in c and s


def build_model(shape: str, out: Path) -> Path:
    """Random-weight Qwen2-VL at a real shape, built on the GPU in bf16; 32 new tokens forced."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm_ray.models.tiny import build_tiny_model

    if (out / "bench_ready").exists():
        return out
    t = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run of the tiny shape
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        build_tiny_model(out, family="qwen2_vl", size=shape)
    torch.set_default_dtype(torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(
        out, dtype=torch.bfloat16, device_map=device
    )
    if shape in REAL_VOCAB:
        model.resize_token_embeddings(REAL_VOCAB[shape], mean_resizing=False)
    # Every setup does the same work: exactly NEW_TOKENS per image, EOS or not.
    model.generation_config.min_new_tokens = NEW_TOKENS
    model.generation_config.max_new_tokens = NEW_TOKENS
    model.save_pretrained(out)
    (out / "bench_ready").write_text(json.dumps({"shape": shape, "build_s": time.time() - t}))
    print(f"built {shape} at {out} in {time.time() - t:.0f}s", flush=True)
    return out


def images(n: int, size: int) -> list:
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        img = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(img).text((size // 4, size // 3), str(1000 + 37 * i), fill="black")
        out.append(img)
    return out


def user_turn() -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image"}]}]


def load_hf(model_dir: Path):
    import torch

    if os.environ.get("BENCH_CUDNN_SDP") == "off":
        from vlm_ray.infer.loading import prefer_fast_attention_kernels

        prefer_fast_attention_kernels()  # what our stage does
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device_map="cuda"
    ).eval()
    return model, processor


def hf_generate(model, processor, imgs: list, **kw) -> dict:
    """One batch: processor, then generate; the seconds of each, the GPU synchronised."""
    import torch

    t0 = time.perf_counter()
    text = processor.apply_chat_template(user_turn(), add_generation_prompt=True)
    batch = processor(
        text=[text] * len(imgs), images=[[im] for im in imgs], padding=True, return_tensors="pt"
    ).to("cuda")
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, **kw)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    new = out.shape[1] - batch["input_ids"].shape[1]
    return {"prep_s": t1 - t0, "gen_s": t2 - t1, "new_tokens": new}


def mode_a(model_dir: Path, n: int, size: int) -> dict:
    model, processor = load_hf(model_dir)
    imgs = images(n, size)
    hf_generate(model, processor, imgs[:2])  # warm-up
    t = time.perf_counter()
    for im in imgs:
        r = hf_generate(model, processor, [im])
        assert r["new_tokens"] == NEW_TOKENS, r
    wall = time.perf_counter() - t
    return {"mode": "a", "images": n, "images_per_s": round(n / wall, 2)}


def mode_b(model_dir: Path, n: int, size: int, batch_sizes: list[int]) -> dict:
    model, processor = load_hf(model_dir)
    imgs = images(n, size)
    hf_generate(model, processor, imgs[:8])  # warm-up
    res: dict = {"mode": "b", "images": n, "by_batch": {}}
    for bs in batch_sizes:
        prep = gen = prefill = 0.0
        t = time.perf_counter()
        for i in range(0, n, bs):
            r = hf_generate(model, processor, imgs[i : i + bs])
            assert r["new_tokens"] == NEW_TOKENS, r
            prep += r["prep_s"]
            gen += r["gen_s"]
        wall = time.perf_counter() - t
        # prefill alone (vision tower + prompt), on one batch, to split generate's time
        p = hf_generate(model, processor, imgs[:bs], max_new_tokens=1, min_new_tokens=1)
        prefill = p["gen_s"] * ((n + bs - 1) // bs)
        res["by_batch"][bs] = {
            "images_per_s": round(n / wall, 2),
            "processor_s": round(prep, 2),
            "prefill_s": round(prefill, 2),
            "decode_s": round(gen - prefill, 2),
            "peak_gib": round(torch_peak_gib(), 1),
        }
        print(f"b bs={bs}: {res['by_batch'][bs]}", flush=True)
    best = max(res["by_batch"], key=lambda b: res["by_batch"][b]["images_per_s"])
    res.update(best_batch=best, images_per_s=res["by_batch"][best]["images_per_s"])
    return res


def mode_p(model_dir: Path, size: int, bs: int) -> dict:
    """Profile one batch of generate (where the decode time goes), then try a static KV cache."""
    from torch.profiler import ProfilerActivity, profile

    model, processor = load_hf(model_dir)
    imgs = images(bs, size)
    hf_generate(model, processor, imgs[:8])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r = hf_generate(model, processor, imgs)
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=15), flush=True)
    print(events.table(sort_by="cpu_time_total", row_limit=25), flush=True)
    res: dict = {"mode": "p", "batch": bs, "dynamic_gen_s": round(r["gen_s"], 2)}
    try:
        hf_generate(model, processor, imgs, cache_implementation="static")  # compile
        r = hf_generate(model, processor, imgs, cache_implementation="static")
        res["static_gen_s"] = round(r["gen_s"], 2)
    except Exception as err:
        res["static_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return res


def bench_spec(run_uri: str, model_dir: Path, engine: str, batch: int) -> dict:
    """The job spec of modes c and s: 32 new tokens, the given batch, BENCH_CACHE's KV cache."""
    return {
        "run": {"uri": run_uri},
        "model": {"name": str(model_dir), "max_seq_length": 4096},
        "data": {"source": "unused"},
        "train": {"engine": engine},
        "infer": {
            "compile_vision": COMPILE_VISION,
            "compile_language": COMPILE_LANGUAGE,
            "fp8": FP8,
            "fp8_scaling": FP8_SCALING,
            "vision_attention": VISION_ATTENTION,
            "defer_stop_check": DEFER_STOP,
        },
        "generation": {
            "max_new_tokens": NEW_TOKENS,
            "batch_size": batch,
            "cache_implementation": CACHE,
        },
    }


def fp8_fidelity(spec, model, processor, model_dir: Path, rows: list[dict]) -> dict:
    """How close the float8 model's next-token logits stay to the bf16 model's, over these rows."""
    import torch

    from vlm_ray.infer.generation import _decode_image, prepare_inputs, prompt_messages
    from vlm_ray.infer.loading import ModelRef, load_for_inference

    bf16_spec = spec.model_copy(
        update={"infer": spec.infer.model_copy(update={"fp8": "off", "compile_vision": False})}
    )
    reference, _, _ = load_for_inference(bf16_spec, ModelRef("base", str(model_dir)))
    imgs = [_decode_image(r["image"]) for r in rows]
    inputs = prepare_inputs(processor, imgs, [prompt_messages(r) for r in rows]).to(model.device)
    with torch.inference_mode():
        got = model(**inputs, logits_to_keep=1).logits[:, -1].float()
        want = reference(**inputs, logits_to_keep=1).logits[:, -1].float()
    del reference
    torch.cuda.empty_cache()
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    return {
        "fp8_rows_compared": len(rows),
        "fp8_logit_cosine_mean": round(cosine.mean().item(), 5),
        "fp8_logit_cosine_min": round(cosine.min().item(), 5),
        "fp8_top1_agreement": round((got.argmax(-1) == want.argmax(-1)).float().mean().item(), 4),
    }


def static_fp8_calibration(spec, size: int):
    """Mode s runs no infer stage, so with infer.fp8_scaling: static its scales calibrate here, on
    a prepared shard of the bench's own images in a temporary folder (None for other settings)."""
    import tempfile

    from vlm_ray.infer.fp8_calibration import SCALES_FILE, Fp8Calibration
    from vlm_ray.storage import LocalStore

    if spec.infer.fp8 == "off" or spec.infer.fp8_scaling != "static":
        return None
    run = Path(tempfile.mkdtemp(prefix="bench-fp8-calibration-"))
    rows = spec.infer.fp8_calibration_rows
    write_inputs(run, rows, size, rows)
    key = "prepared/heldout/shard-00000.parquet"
    return Fp8Calibration(LocalStore(run), SCALES_FILE, key, rows, "bench mode s")


def compile_stats() -> dict:
    """What torch.compile did so far in this process: frames compiled (recompilations included),
    graphs, graph breaks, and the seconds in each compile phase (Dynamo, AOT autograd, Inductor)."""
    from torch._dynamo.utils import compile_times, counters

    return {
        "frames_compiled": counters["frames"].get("ok", 0),
        "graphs": counters["stats"].get("unique_graphs", 0),
        "graph_breaks": sum(counters["graph_break"].values()),
        "compile_times": compile_times(repr="str", aggregate=True),
    }


@contextlib.contextmanager
def compile_heartbeat(what: str, every_s: float = 60.0):
    """Print compile_stats() every `every_s` while the block runs: a first generate that takes
    minutes shows whether it compiles one big graph or recompiles again and again."""
    stop = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every_s):
            stats = {k: v for k, v in compile_stats().items() if k != "compile_times"}
            print(
                f"{what}: {time.perf_counter() - start:.0f} s so far; {json.dumps(stats)}",
                flush=True,
            )

    threading.Thread(target=beat, daemon=True).start()
    try:
        yield
    finally:
        stop.set()


def mode_s(
    model_dir: Path,
    size: int,
    bs: int,
    engine: str,
    profile_dir: Path | None,
    profile_what: str,
    table_batches: int = 2,
) -> dict:
    """Where our stage's time goes: its own loading and generation code on one batch, phase by phase.

    Phases (device synchronised around each): the processor on the GPU, the vision tower alone,
    prefill (generate with one new token), and the whole generate; then predict_table over
    table_batches batches (decoding and preprocessing overlapped). profile_what picks which of
    prefill, generate and predict_table are profiled: each gets torch.profiler tables and a
    device timeline (bench/device_timeline.py), printed and written under profile_dir if given.
    """
    import pyarrow as pa
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.device_timeline import all_threads_config, device_timeline
    from vlm_ray.config import parse_spec
    from vlm_ray.infer import generation
    from vlm_ray.infer.generation import (
        _decode_image,
        generate_batch,
        generation_kwargs,
        predict_table,
        prepare_inputs,
        processor_device,
        prompt_messages,
    )
    from vlm_ray.infer.loading import ModelRef, load_for_inference
    from vlm_ray.models.submodules import inner_module

    generation.SIDE_STREAM = PREPROCESS_STREAM == "side"
    spec = parse_spec(bench_spec("/tmp/unused", model_dir, engine, bs))
    model, processor, note = load_for_inference(
        spec, ModelRef("base", str(model_dir)), static_fp8_calibration(spec, size)
    )
    cuda = torch.cuda.is_available()

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    rows = prepared_rows(table_batches * bs, size)
    imgs = [_decode_image(r["image"]) for r in rows[:bs]]
    msgs = [prompt_messages(r) for r in rows[:bs]]
    device = processor_device(model, processor)
    kwargs = generation_kwargs(spec.generation)
    one = {**kwargs, "max_new_tokens": 1, "min_new_tokens": 1}
    inputs = prepare_inputs(processor, imgs, msgs, device)
    print(f"mode s: loaded ({note}); the first generate compiles what the spec asks", flush=True)
    with compile_heartbeat("mode s: first generate"):
        _, warmup_s = timed(lambda: generate_batch(model, processor, inputs, kwargs))  # compiles
    # Printed now, so that a run cut off later still says where the first generate's time went.
    compiled = compile_stats()
    times = compiled.pop("compile_times")
    print(f"mode s: first generate {warmup_s:.1f} s; {json.dumps(compiled)}\n{times}", flush=True)
    inputs, prep_s = timed(lambda: prepare_inputs(processor, imgs, msgs, device))
    inputs = inputs.to(model.device)
    visual = inner_module(model, "visual")
    with torch.inference_mode():
        _, vision_s = timed(
            lambda: visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        )
    _, prefill_s = timed(lambda: generate_batch(model, processor, inputs, one))
    outs, generate_s = timed(lambda: generate_batch(model, processor, inputs, kwargs))
    assert all(o.tokens == NEW_TOKENS for o in outs), "every image, 32 tokens"
    table = pa.Table.from_pylist(rows)
    _, table_s = timed(lambda: predict_table(model, processor, table, spec.generation))
    fidelity = fp8_fidelity(spec, model, processor, model_dir, rows[:32]) if FP8 != "off" else {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "cuda_time_total" if cuda else "cpu_time_total"
    tables = []
    timelines: dict[str, dict] = {}
    profiled = [
        ("prefill (1 new token)", lambda: generate_batch(model, processor, inputs, one)),
        (f"generate ({NEW_TOKENS})", lambda: generate_batch(model, processor, inputs, kwargs)),
        # The steady state as the pool runs it: decoding and preprocessing threads beside generate.
        (
            f"predict_table ({len(rows)} rows)",
            lambda: predict_table(model, processor, table, spec.generation),
        ),
    ]
    for what, call in profiled[: {"none": 0, "prefill": 1, "all": 3}[profile_what]]:
        with profile(activities=activities, experimental_config=all_threads_config()) as prof:
            call()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        for sort in dict.fromkeys([key, "cpu_time_total"]):
            text = events.table(sort_by=sort, row_limit=30)
            tables.append(f"## {what}, batch {bs}, by {sort}\n{text}")
        timeline = device_timeline(prof.events(), "CUDA" if cuda else "CPU")
        print(f"mode s: {what}: {json.dumps(timeline)}", flush=True)
        tables.append(f"## {what}, batch {bs}, device timeline\n{json.dumps(timeline, indent=1)}")
        timelines[what] = {k: v for k, v in timeline.items() if k != "largest_gaps"}
    label = f"{engine}_{CACHE or 'dynamic'}_{'cv' if COMPILE_VISION else 'eager'}_fp8{FP8}{'' if FP8_SCALING == 'row' else '-' + FP8_SCALING}{'_cl' if COMPILE_LANGUAGE else ''}{'' if VISION_ATTENTION == 'auto' else '_' + VISION_ATTENTION}{'' if PREPROCESS_STREAM == 'side' else '_onestream'}{'' if table_batches == 2 else f'_tb{table_batches}'}{'_ds' if DEFER_STOP else ''}_bs{bs}"
    if tables and profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        (profile_dir / f"profile_s_{label}.txt").write_text("\n".join(tables))
    elif tables:
        print("\n".join(tables), flush=True)
    return {
        "mode": "s",
        "engine": note,
        "batch": bs,
        "compile_vision": COMPILE_VISION,
        "warmup_generate_s": round(warmup_s, 1),
        "first_generate_compiled": compiled,
        "processor_s": round(prep_s, 3),
        "vision_tower_s": round(vision_s, 3),
        "prefill_s": round(prefill_s, 3),
        "decode_s": round(generate_s - prefill_s, 3),
        "decode_ms_per_step": round(1e3 * (generate_s - prefill_s) / (NEW_TOKENS - 1), 2),
        "predict_table_images_per_s": round(len(rows) / table_s, 2),
        "table_batches": table_batches,
        "profiled_timelines": timelines,
        "peak_gib": round(torch_peak_gib(), 1) if cuda else None,
        **fidelity,
    }


def torch_peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def write_inputs(run: Path, n: int, size: int, rows_per_shard: int) -> None:
    """n images as prepared held-out shards."""
    from vlm_ray.data.shards import write_shard
    from vlm_ray.storage import LocalStore

    store = LocalStore(run)
    rows = prepared_rows(n, size)
    for s, start in enumerate(range(0, n, rows_per_shard)):
        write_shard(
            store, f"prepared/heldout/shard-{s:05d}.parquet", rows[start : start + rows_per_shard]
        )


def prepared_rows(n: int, size: int) -> list[dict]:
    """n images as rows of a prepared held-out shard (docs/architecture.md schema)."""
    from vlm_ray.data.chat import to_messages

    rows = []
    for i, im in enumerate(images(n, size)):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        rows.append(
            {
                "id": f"img-{i:06d}",
                "source_id": str(i),
                "image": buf.getvalue(),
                "width": size,
                "height": size,
                "prompt": PROMPT,
                "system_prompt": None,
                "text": None,
                "messages": json.dumps(to_messages(PROMPT, None, None)),
            }
        )
    return rows


def mode_c(
    model_dir: Path,
    n: int,
    size: int,
    batch: int,
    gpus: int,
    engine: str,
    rows_per_shard: int,
    cpus: int,
    gpus_per_actor: float = 1.0,
    actors_per_gpu: int = 1,
) -> dict:
    """The stage's actor pool over n images in shards, one actor per GPU share. Several actors
    (each its own process and model copy) share a GPU with actors_per_gpu > 1
    (infer.actors_per_gpu) or gpus_per_actor < 1 (ray.num_gpus_per_worker, as inference run 15
    measured), so one's host-side gaps can be filled by another's kernels."""
    import logging

    import ray

    from vlm_ray.config import parse_spec
    from vlm_ray.infer.pool import default_pool_size
    from vlm_ray.infer.throughput import pool_steady_rate, shared_window_rate
    from vlm_ray.ledger import ShardLedger
    from vlm_ray.stages.infer import run_infer
    from vlm_ray.storage import LocalStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # inputs are reused across calls with the same images, size and shards (not rewritten)
    run = Path(f"/tmp/infer_bench_run_{model_dir.name}_{n}_{size}px_{rows_per_shard}")
    if not run.exists():
        write_inputs(run, n, size, rows_per_shard)
    shutil.rmtree(run / "predictions", ignore_errors=True)
    ray.init(num_gpus=gpus, include_dashboard=False)
    raw = bench_spec(str(run), model_dir, engine, batch)
    spec = parse_spec(
        {
            **raw,
            "infer": {**raw["infer"], "actors_per_gpu": actors_per_gpu},
            "ray": {"num_cpus_per_worker": cpus, "num_gpus_per_worker": gpus_per_actor},
        }
    )
    actors = default_pool_size(spec, gpus)  # the stage's own default, as run_infer sizes it
    t = time.perf_counter()
    result = run_infer(spec, models=["base"])["models"]["base"]
    wall = time.perf_counter() - t
    records = sorted(
        ShardLedger(LocalStore(run), "predictions/base").records(), key=lambda r: r["committed_at"]
    )
    per_actor = result["actors"]  # the stage's own per-actor summary (vlm_ray.infer.throughput)
    rows = [
        json.loads(x)
        for k in (run / "predictions/base").glob("*.jsonl")
        for x in k.read_text().splitlines()
    ]
    assert len(rows) == n and all(r["tokens"] == NEW_TOKENS for r in rows), "every image, 32 tokens"
    return {
        "mode": "c",
        "engine": engine,
        "gpus": gpus,
        "gpus_per_actor": gpus_per_actor,
        "actors_per_gpu": actors_per_gpu,
        "actors": actors,
        "batch": batch,
        "images": n,
        "end_to_end_images_per_s": round(n / wall, 2),
        # each actor's own rate after its first shard, summed
        "images_per_s": pool_steady_rate(per_actor),
        "images_per_s_by_actor": {k: a["steady_images_per_s"] for k, a in per_actor.items()},
        "gpu_peak_gib_by_actor": {k: a["gpu_peak_gib"] for k, a in per_actor.items()},
        # "mps" or "time-sliced" with actors_per_gpu above 1 (vlm_ray.infer.gpu_sharing)
        "gpu_sharing_by_actor": {k: a["gpu_sharing"] for k, a in per_actor.items()},
        # once every actor is warm: the figure to use when actors share a GPU
        "images_per_s_all_warm": shared_window_rate(records),
        "shard_commits": [
            [r["pid"], r["rows"], round(r["committed_at"] - records[0]["committed_at"], 2)]
            for r in records
        ],
        "wall_s": round(wall, 1),
        "shards": len(records),
        "errors": result["errors"],
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by tests that check bench/chains/ before device time)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="2b", choices=["tiny", "small", "2b", "7b"])
    p.add_argument("--modes", default="a,b,c")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--images-a", type=int, default=16)
    p.add_argument("--images-b", type=int, default=512)
    p.add_argument("--images-c", type=int, default=1024)
    p.add_argument("--batch-sizes", default="8,32,64,128,256")
    p.add_argument("--batch", type=int, default=256, help="generation.batch_size in mode c")
    p.add_argument("--rows-per-shard", type=int, default=256)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=int, default=4)
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        default=1.0,
        help="mode c: ray.num_gpus_per_worker; 0.5 puts two actors on each GPU (run 15's way)",
    )
    p.add_argument(
        "--actors-per-gpu",
        type=int,
        default=1,
        help="mode c: infer.actors_per_gpu, model copies per GPU (the spec's way to share one)",
    )
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "unsloth"])
    p.add_argument("--out", default="infer_speed.jsonl")
    p.add_argument("--profile-dir", type=Path, help="mode s: write its profiler tables here")
    p.add_argument(
        "--profile",
        default="all",
        choices=["all", "prefill", "none"],
        help="mode s: profile one prefill and one whole generate (all), the prefill only, or none",
    )
    p.add_argument(
        "--table-batches",
        type=int,
        default=2,
        help="mode s: batches in its predict_table run (more: closer to the pool's steady state)",
    )
    p.add_argument("--run-mode", help=argparse.SUPPRESS)  # internal: one mode in this process
    return p


def main() -> None:
    a = build_parser().parse_args()
    model_dir = Path(f"/tmp/infer_bench_{a.shape}")
    if a.run_mode is None:
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--run-mode", "build"], check=True)
        for mode in a.modes.split(","):
            code = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--run-mode", mode]
            ).returncode
            if code:
                print(f"mode {mode} failed with exit code {code}", flush=True)
        return
    if a.run_mode == "build":
        build_model(a.shape, model_dir)
        return
    import torch

    if a.run_mode == "a":
        res = mode_a(model_dir, a.images_a, a.size)
    elif a.run_mode == "b":
        res = mode_b(model_dir, a.images_b, a.size, [int(b) for b in a.batch_sizes.split(",")])
    elif a.run_mode == "p":
        res = mode_p(model_dir, a.size, a.batch)
    elif a.run_mode == "s":
        res = mode_s(
            model_dir, a.size, a.batch, a.engine, a.profile_dir, a.profile, a.table_batches
        )
    elif a.run_mode == "c":
        res = mode_c(
            model_dir,
            a.images_c,
            a.size,
            a.batch,
            a.gpus,
            a.engine,
            a.rows_per_shard,
            a.cpus_per_actor,
            a.gpus_per_actor,
            a.actors_per_gpu,
        )
    else:
        raise SystemExit(f"unknown mode {a.run_mode}")
    res.update(
        cudnn_sdp=os.environ.get("BENCH_CUDNN_SDP", "on"),
        cache=CACHE or "dynamic",
        compile_vision=COMPILE_VISION,
        fp8=FP8,
        fp8_scaling=FP8_SCALING,
        vision_attention=VISION_ATTENTION,
        compile_language=COMPILE_LANGUAGE,
        defer_stop_check=DEFER_STOP,
        preprocess_stream=PREPROCESS_STREAM if a.run_mode == "s" else "side",
        shape=a.shape,
        size=a.size,
        new_tokens=NEW_TOKENS,
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    )
    print("RESULT " + json.dumps(res), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
