"""Training speed: HF baseline vs bare Unsloth notebook loop vs our Unsloth engine in a Ray actor.

Run on the GPU machine (docs/gpu.md has the exact device calls), one shape per call:

    PYTHONUNBUFFERED=1 python bench/train_speed.py --shape 2b --out $OUT/train_speed_2b.json
    PYTHONUNBUFFERED=1 python bench/train_speed.py --shape 7b --modes hf,unsloth,unsloth4,stage

The model is a random-weight Qwen2-VL (--shape 2b, 7b) or Llama-3.2-11B-Vision (--shape 11b,
family mllama) at the real shape (vlm_ray.models.tiny SHAPES), built once on the GPU in bf16
under /tmp, with its embeddings padded to the real vocabulary (the LM head and loss cost as
much as in the real model). Every mode trains LoRA r=16 on all linear
layers at batch 4 on the same 448 px images and answers, and runs in its own process
(importing unsloth patches transformers for the whole process). Timed steps start after
--warmup steps (Unsloth compiles during its first steps). Modes:

  hf        transformers + PEFT + TRL SFTTrainer, bf16, sdpa, gradient checkpointing (a)
  unsloth   the bare Unsloth vision notebook: FastVisionModel + UnslothVisionDataCollator +
            SFTTrainer, 16-bit (b); then the same model without Trainer/collation (the bare
            step), and at --big-batch, to show where the time goes
  unsloth4  the same notebook with load_in_4bit (QLoRA)
  stage     our engine (vlm_ray.train.unsloth_engine.train_unsloth) inside a num_gpus=1 Ray
            actor, reading prepared parquet shards from a local store (c)
  profile   torch.profiler over bare Unsloth steps: the top CUDA/CPU ops, into --out's folder
            (--profile-steps N profiles N of the stage's own Trainer steps instead, after its
            timed steps)

MFU counts 6 x params x tokens (language model over every token, vision tower over every
patch) against the GPU's dense bf16 peak; the attention's own FLOPs are left out.

Each mode's result carries `conditions`: the host's load and CPU clock and the GPU's SM clock,
power, temperature and utilisation over its timed steps (bench/machine_conditions.py, sampled
every 2 s by the driver), so a slow run can be told apart from a slow machine.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.machine_conditions import ConditionsSampler

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
REAL_VOCAB = {"2b": 151936, "7b": 152064, "11b": 128256}
FAMILY = {"2b": "qwen2_vl", "7b": "qwen2_vl", "11b": "mllama"}  # 11b: Llama-3.2-11B-Vision
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, from NVIDIA's data sheets
PROMPT = "Read the number in this image."
HF_TARGETS = [  # every linear layer of the language model and the vision tower (as the probe)
    *("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    *("qkv", "proj", "fc1", "fc2"),
]


# --- model and data (shared by every mode) -------------------------------------------------


def build_model(shape: str, out: Path) -> Path:
    """Random-weight model at a real shape (FAMILY), built on the GPU in bf16, real-size vocabulary."""
    import torch

    from vlm_ray.models.tiny import build_tiny_model

    if (out / "bench_ready").exists():
        return out
    t = time.time()
    # Constructing 7B parameters on the CPU takes many minutes; on the GPU in bf16, seconds.
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        build_tiny_model(out, family=FAMILY[shape], size=shape)
    torch.set_default_dtype(torch.float32)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        out, dtype=torch.bfloat16, device_map="cuda"
    )
    real_vocabulary(model, FAMILY[shape], REAL_VOCAB[shape])
    model.save_pretrained(out)
    (out / "bench_ready").write_text(json.dumps({"shape": shape, "build_s": time.time() - t}))
    print(f"built {shape} at {out} in {time.time() - t:.0f}s", flush=True)
    return out


def real_vocabulary(model, family: str, vocab: int) -> None:
    """Embeddings and LM head at the real vocabulary size, so they cost what they do in the real model.

    Mllama keeps vocab + 8 embedding rows (the image token and padding) over a head of vocab
    outputs, and rebuilds that layout from config.text_config.vocab_size when it loads.
    """
    import torch

    if family != "mllama":
        model.resize_token_embeddings(vocab, mean_resizing=False)
        return
    # the input embeddings and the head, both to vocab + 8; then the head back to vocab
    model.resize_token_embeddings(vocab + 8, mean_resizing=False)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight[:vocab].detach().clone())
    head.out_features = vocab
    model.config.text_config.vocab_size = vocab


def sample_rows(n: int, size: int) -> list[dict]:
    """n examples: a number drawn on a white size x size image; the answer repeats it 8 times."""
    from PIL import Image, ImageDraw

    rows = []
    for i in range(n):
        img = Image.new("RGB", (size, size), "white")
        number = str(1000 + 37 * i)
        ImageDraw.Draw(img).text((size // 4, size // 3), number, fill="black")
        rows.append({"image": img, "answer": (number + " ") * 8})
    return rows


def messages(answer: str | None, with_image: object = None) -> list[dict]:
    image = {"type": "image", **({"image": with_image} if with_image is not None else {})}
    user = {"role": "user", "content": [{"type": "text", "text": PROMPT}, image]}
    return (
        [user]
        if answer is None
        else [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    )


def make_clock():
    """A TrainerCallback that times each optimiser step, synchronising the GPU at both ends.

    Defined on call: transformers must not be imported before unsloth in an Unsloth process.
    """
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.begins: list[float] = []
            self.ends: list[float] = []

        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.begins.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        @property
        def times(self) -> list[float]:
            """Each finished step's time from its begin callback to its end callback."""
            return [end - begin for begin, end in zip(self.begins, self.ends, strict=False)]

        def window_s(self, warmup: int, upto: int | None = None) -> float | None:
            """Wall time from the first timed step's begin to the last timed step's end."""
            ends = self.ends[:upto]
            if len(ends) <= warmup:
                return None
            return ends[-1] - self.begins[warmup]

    return StepClock()


def make_early_result(step: int, timing, checkpointing):
    """A TrainerCallback that prints a RESULT line when optimiser step `step` ends: `timing()`,
    the peak GPU memory so far and the checkpointing report, marked partial. The stage's own
    RESULT, printed when it returns, comes later and replaces it (run_child keeps the last)."""
    import torch
    from transformers import TrainerCallback

    class EarlyResult(TrainerCallback):
        def on_step_end(self, args, state, control, **k):
            if state.global_step != step:
                return
            res = {
                **timing(),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if torch.cuda.is_available()
                else None,
                **checkpointing.summary(),
                "partial": f"printed after step {step}; the run went on (profiling, saving)",
            }
            print("RESULT " + json.dumps(res), flush=True)

    return EarlyResult()


def make_step_losses():
    """A TrainerCallback that keeps the loss of every logged step (logging_steps: 1), rounded
    to 4 digits. Two setups that see the same batches and should compute the same thing log the
    same first loss (LoRA's B starts at zero) and close ones after it: run 27's
    lora_add_without_copy rows parted at the second step (12.55 against 12.70)."""
    from transformers import TrainerCallback

    class StepLosses(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 4))

    return StepLosses()


def sites_summary(kind: str, total_key: str, step: int, sites) -> dict:
    """A diagnostic step's result: which step, how many events, the 25 most frequent call sites."""
    return {
        f"{kind}_step": step,
        total_key: sum(sites.values()),
        f"{kind}_sites": dict(sites.most_common(25)),
    }


def make_sync_sites(step: int):
    """A TrainerCallback that records where optimiser step `step` synchronises with the GPU.

    torch's sync debug mode warns at every synchronising CUDA call (an .item(), a copy to
    pageable host memory, a nonzero...); each warning's Python stack is counted by its call site
    (bench/trace_sites.call_site: the innermost frames outside torch), so the sites that stall
    the CPU-GPU pipeline are named with how often they ran. Defined on call, for the same
    reason as make_clock.
    """
    import traceback
    import warnings
    from collections import Counter

    import torch
    from transformers import TrainerCallback

    from bench.trace_sites import call_site

    class SyncSites(TrainerCallback):
        def __init__(self) -> None:
            self.sites: Counter = Counter()

        def _record(self, message, category, filename, lineno, file=None, line=None):
            if "synchronizing" not in str(message):
                return self._show(message, category, filename, lineno, file, line)
            stack = traceback.extract_stack()[:-1]
            self.sites[call_site([(f.filename, f.lineno, f.name) for f in reversed(stack)])] += 1

        def on_step_begin(self, args, state, control, **k):
            if state.global_step == step:
                self._show, warnings.showwarning = warnings.showwarning, self._record
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **k):
            if state.global_step == step + 1:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = self._show

        def summary(self) -> dict:
            return sites_summary("sync", "syncs_per_step", step, self.sites)

    return SyncSites()


# What --copy-sites prices by launcher unless told: run 25's device-to-device copies (523 per
# step) and float8 quantizing reductions (their kernels' names hold "amax").
GPU_TIME_SITES = ("Memcpy DtoD", "amax")


def make_copy_sites(step: int, trace: Path, gpu_patterns: tuple[str, ...] = ()):
    """A TrainerCallback that profiles optimiser step `step` with Python stacks and counts its
    host-side copies and stream synchronisations by the Python code around them.

    The complement of make_sync_sites (bench/trace_sites.py): it also sees the copies torch's
    sync debug mode does not flag (issued outside torch's copy path, e.g. by a C extension, or
    non-blocking into pageable memory). With `gpu_patterns`, the GPU time of the kernels and
    copies named by them is summed by the operators and Python code that launched them
    (bench/trace_sites.gpu_time_sites): run 25's 523 device-to-device copies per step.
    """
    from collections import Counter

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    names = ("cudaMemcpyAsync", "cudaMemcpy", "cudaStreamSynchronize", "cudaDeviceSynchronize")

    class CopySites(TrainerCallback):
        def __init__(self) -> None:
            self.sites: Counter = Counter()
            self.gpu_sites: dict = {}
            self._prof = None

        def on_step_begin(self, args, state, control, **k):
            if state.global_step == step:
                activities = [ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(ProfilerActivity.CUDA)
                self._prof = profile(activities=activities, with_stack=True)
                self._prof.start()

        def on_step_end(self, args, state, control, **k):
            if self._prof is not None and state.global_step == step + 1:
                self._prof.stop()
                self._prof.export_chrome_trace(str(trace))
                self._prof = None
                from bench.trace_sites import event_sites, gpu_time_sites, load_trace

                events = load_trace(trace)  # parsed once for both
                self.sites = event_sites(events, names)
                if gpu_patterns:
                    self.gpu_sites = gpu_time_sites(events, gpu_patterns)

        def summary(self) -> dict:
            gpu = {}
            if gpu_patterns:
                top = dict(list(self.gpu_sites.items())[:25])
                gpu = {"gpu_time_patterns": list(gpu_patterns), "gpu_time_sites": top}
            return {**sites_summary("copy", "copies_and_syncs_per_step", step, self.sites), **gpu}

    return CopySites()


def make_memory_sites(step: int):
    """A TrainerCallback that records every GPU allocation of optimiser step `step` with its Python
    stack and reports what was alive at the step's peak, by call site (bench/memory_sites.py),
    with the memory held before the step (weights, optimizer state) by parameter group."""
    from collections import Counter

    import torch
    from transformers import TrainerCallback

    from bench.memory_sites import GIB, gib, parameter_bytes, peak_live_sites

    parts = {"vision": "visual", "embed_tokens": "embed_tokens", "lm_head": "lm_head"}

    class MemorySites(TrainerCallback):
        def __init__(self) -> None:
            self.result: dict = {}

        def on_step_begin(self, args, state, control, model=None, **k):
            if state.global_step == step:
                torch.cuda.synchronize()
                self.base = torch.cuda.memory_allocated()
                self.params = parameter_bytes(model, parts) if model is not None else Counter()
                torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")

        def on_step_end(self, args, state, control, **k):
            if state.global_step == step + 1 and not self.result:
                torch.cuda.synchronize()
                snap = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
                device = torch.cuda.current_device()
                peak = peak_live_sites(snap["device_traces"][device])
                self.result = {
                    "memory_step": step,
                    "memory_base_gib": round(self.base / GIB, 3),
                    "memory_base_parameters_gib": gib(self.params),
                    "memory_step_peak_above_base_gib": round(peak["peak_bytes"] / GIB, 3),
                    "memory_peak_sites_gib": gib(peak["sites"], 25),
                }

        def summary(self) -> dict:
            return self.result

    return MemorySites()


def steady(times: list[float], warmup: int, batch: int, window_s: float | None = None) -> dict:
    """Throughput over the timed steps, with their median and slowest step.

    With window_s (the wall time from the first timed step's begin to the last one's end), the
    throughput is the timed steps' samples over that window: everything the run spent, between
    the step callbacks too. Run 21's callback intervals held a few implausibly short steps
    (its mean 848.6 ms against a median of 1,065.4 ms, while its progress bar paced ~1.1 s per
    step), so a mean of the intervals can overstate the speed; short_steps counts the intervals
    under half the median. Without window_s (tests, old callers) the intervals' mean is used.
    A stall in the timed window (27 s in one batch-64 step of run 16, most likely a recompile)
    is time the run really spent, so it stays in; the median and max show whether it is there.
    """
    timed = times[warmup:]
    if not timed:
        return {"error": f"only {len(times)} steps ran, {warmup} were warm-up"}
    median = statistics.median(timed)
    step = window_s / len(timed) if window_s else statistics.mean(timed)
    return {
        "samples_per_s": round(batch / step, 3),
        "step_ms": round(step * 1e3, 1),
        "median_step_ms": round(median * 1e3, 1),
        "max_step_ms": round(max(timed) * 1e3, 1),
        "timed_steps": len(timed),
        "short_steps": sum(1 for t in timed if t < median / 2),
        "first_step_s": round(times[0], 1),
        # each timed step, so an outlier (run 23's HF: one 3.08 s step, median 0.81 s) is visible
        "timed_step_ms": [round(t * 1e3, 1) for t in timed],
    }


def image_patches(pixel_values, patch: int = 14) -> int:
    """Patches the vision tower runs over: Qwen2-VL's are rows of a 2-D tensor; Mllama's
    (batch, images, tiles, C, H, W) are every tile's, padding tiles included (they are computed)."""
    if pixel_values.dim() == 2:
        return int(pixel_values.shape[0])
    *lead, _, h, w = pixel_values.shape
    return int(math.prod(lead)) * (h // patch) * (w // patch)


def flops_per_sample(model, batch) -> float:
    """6 x (language-model params x tokens + vision params x patches) per sample."""
    from vlm_ray.models.families import family_by_name

    family = family_by_name(model.config.model_type)
    n_vis = sum(
        p.numel()
        for n, p in model.named_parameters()
        if family.in_vision_tower(n) and "lora_" not in n
    )
    n_all = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    n_lm = n_all - n_vis
    rows = batch["input_ids"].shape[0]
    tokens = int(batch["attention_mask"].sum())
    return 6 * (n_lm * tokens + n_vis * image_patches(batch["pixel_values"])) / rows


def peak_flops(gpu_name: str) -> float:
    return next((v for k, v in PEAK_BF16.items() if k in gpu_name), 989e12)


def sft_args(out: str, steps: int, batch: int, **extra):
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=out,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=2e-4,
        warmup_steps=0,
        logging_steps=1,
        optim="adamw_torch",
        bf16=torch.cuda.is_bf16_supported(),
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=2048,
        **extra,
    )


# --- modes (each in its own process) --------------------------------------------------------


def mode_hf(a, model_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTTrainer

    proc = AutoProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "right"
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device_map="cuda"
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=HF_TARGETS)
    )
    steps = a.warmup + a.steps
    rows = sample_rows(a.batch * steps, a.image)

    def collate(items):
        picked = [rows[it["i"]] for it in items]
        texts = [proc.apply_chat_template(messages(r["answer"]), tokenize=False) for r in picked]
        b = proc(
            text=texts, images=[[r["image"]] for r in picked], padding=True, return_tensors="pt"
        )
        labels = b["input_ids"].clone()
        labels[b["attention_mask"] == 0] = -100
        b["labels"] = labels
        return b

    clock = make_clock()
    torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(
        model=model,
        args=sft_args("/tmp/bench_hf", steps, a.batch),
        train_dataset=Dataset.from_dict({"i": list(range(len(rows)))}),
        data_collator=collate,
        processing_class=proc,
        callbacks=[clock],
    )
    trainer.train()
    res = steady(clock.times, a.warmup, a.batch, clock.window_s(a.warmup))
    b = collate([{"i": i} for i in range(a.batch)])
    res.update(
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        flops_per_sample=flops_per_sample(model, b),
        seq_len=int(b["input_ids"].shape[1]),
    )
    return res


def _unsloth_notebook(a, model_dir: Path, load_in_4bit: bool, gc) -> tuple:
    """The notebook's model, processor and collator, every argument as the notebook writes it."""
    from unsloth import FastVisionModel
    from unsloth.trainer import UnslothVisionDataCollator

    model, proc = FastVisionModel.from_pretrained(
        str(model_dir),
        load_in_4bit=load_in_4bit,
        use_gradient_checkpointing=gc,
        max_seq_length=2048,
    )
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=True,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=16,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    FastVisionModel.for_training(model)
    return model, proc, UnslothVisionDataCollator(model, proc)


def _bare_steps(model, batch, n: int, warm: int) -> float:
    """Seconds per forward+backward+AdamW step on one fixed batch already on the GPU."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for i in range(warm + n):
        if i == warm:
            torch.cuda.synchronize()
            t = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def mode_unsloth(a, model_dir: Path, load_in_4bit: bool = False) -> dict:
    import torch
    import unsloth  # noqa: F401  (first)
    from trl import SFTTrainer

    gc = {"unsloth": "unsloth", "true": True, "false": False}[a.gc]
    model, proc, collator = _unsloth_notebook(a, model_dir, load_in_4bit, gc)
    steps = a.warmup + a.steps
    rows = sample_rows(a.batch * steps, a.image)
    data = [{"messages": messages(r["answer"], r["image"])} for r in rows]
    clock = make_clock()
    torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(
        model=model,
        processing_class=proc,
        data_collator=collator,
        train_dataset=data,  # the notebook passes a list of dicts with PIL images
        args=sft_args("/tmp/bench_unsloth", steps, a.batch),
        callbacks=[clock],
    )
    trainer.train()
    res = steady(clock.times, a.warmup, a.batch, clock.window_s(a.warmup))
    res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    t = time.perf_counter()
    batch = collator(data[: a.batch])
    res["collate_ms"] = round((time.perf_counter() - t) * 1e3, 1)
    res["flops_per_sample"] = flops_per_sample(model, batch)
    res["seq_len"] = int(batch["input_ids"].shape[1])
    if load_in_4bit or a.no_split:
        return res
    # Where the time goes: the same step without Trainer and collation, then at a bigger batch.
    gpu_batch = {k: v.cuda() for k, v in batch.items()}
    res["bare_step_ms"] = round(_bare_steps(model, gpu_batch, 8, 3) * 1e3, 1)
    res["bare_samples_per_s"] = round(a.batch / (res["bare_step_ms"] / 1e3), 3)
    big = collator(
        [{"messages": messages(r["answer"], r["image"])} for r in sample_rows(a.big_batch, a.image)]
    )
    big = {k: v.cuda() for k, v in big.items()}
    torch.cuda.reset_peak_memory_stats()
    try:
        s = _bare_steps(model, big, 5, 3)
        res[f"bare_bs{a.big_batch}_samples_per_s"] = round(a.big_batch / s, 3)
        res[f"bare_bs{a.big_batch}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except torch.OutOfMemoryError:
        res[f"bare_bs{a.big_batch}_samples_per_s"] = "out of memory"
    return res


def mode_profile(a, model_dir: Path) -> dict:
    import torch
    import unsloth  # noqa: F401  (first)
    from torch.profiler import ProfilerActivity, profile

    model, _, collator = _unsloth_notebook(a, model_dir, False, "unsloth")
    rows = sample_rows(a.batch, a.image)
    batch = collator([{"messages": messages(r["answer"], r["image"])} for r in rows])
    batch = {k: v.cuda() for k, v in batch.items()}
    step_s = _bare_steps(model, batch, 3, 8)  # warm up compilation before profiling
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    from vlm_ray.train.step_profiler import gpu_busy_us

    out = Path(a.out).parent
    events = prof.key_averages()  # aggregating a 7B step's events takes seconds: once
    for key in ("cuda_time_total", "cpu_time_total"):
        table = events.table(sort_by=key, row_limit=30, max_name_column_width=70)
        (out / f"profile_{a.shape}_{key}.txt").write_text(table)
    cuda_us = gpu_busy_us(events) / 3
    return {"bare_step_ms": round(step_s * 1e3, 1), "gpu_busy_ms_per_step": round(cuda_us / 1e3, 1)}


def _profile_of(store, out_dir: Path, tag: str) -> dict:
    """The stage's profile summary (prefixed profile_), its tables copied beside --out."""
    from vlm_ray import layout

    for key in store.list(layout.TRAIN_PROFILE):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".txt"):
            (out_dir / f"profile_{tag}_{name}").write_text(store.read_text(key))
    summary = store.read_json(f"{layout.TRAIN_PROFILE}/summary.json")
    return {f"profile_{k}": v for k, v in summary.items()}


def mode_stage(a, model_dir: Path) -> dict:
    """Our engine, exactly as the train stage runs it: in a num_gpus=1 Ray actor over prepared shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from vlm_ray import layout
    from vlm_ray.config import apply_overrides, parse_spec
    from vlm_ray.storage import LocalStore

    # Profiled steps (--profile-steps) come after the timed ones and are not in the timing; the
    # profiler warms up over one step of its own before them (StepProfiler).
    profiled = a.profile_steps + 1 if a.profile_steps else 0
    steps = (
        a.warmup + a.steps + profiled + int(a.sync_sites) + int(a.copy_sites) + int(a.memory_sites)
    )
    # One store per GPU: two chains may run this mode at once (bench/device_chains.sh).
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    store = LocalStore(f"/tmp/bench_stage_{a.shape}_gpu{gpu}")
    store.delete_prefix(layout.TRAIN_PROFILE)  # an earlier invocation's profile is not this one's
    recs = []
    for i, r in enumerate(sample_rows(a.batch * steps, a.image)):
        buf = io.BytesIO()
        r["image"].save(buf, format="PNG")
        recs.append(
            {
                "id": f"r{i:06d}",
                "source_id": str(i),
                "image": buf.getvalue(),
                "width": a.image,
                "height": a.image,
                "prompt": PROMPT,
                "system_prompt": None,
                "text": r["answer"],
                "messages": json.dumps(messages(r["answer"])),
            }
        )
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(recs), buf)
    store.write_bytes(layout.prepared_shard("train", 0), buf.getvalue())
    raw = {
        "run": {"uri": store.uri},
        "model": {"name": str(model_dir), "max_seq_length": 2048},
        "data": {"source": "bench", "image_min_size": a.image, "image_max_size": a.image},
        "train": {
            "engine": "unsloth",
            "per_device_train_batch_size": a.batch,
            "gradient_accumulation_steps": 1,
            "max_steps": steps,
            "warmup_steps": 0,
            "save_steps": 10_000,
            "logging_steps": 1,
            "train_on_responses_only": True,
            "dataloader_num_workers": a.workers,
        },
    }
    spec = parse_spec(apply_overrides(raw, a.set), "bench --set")
    out_dir = Path(a.out).resolve().parent

    @ray.remote(num_gpus=1)
    class Trainer:
        def train(self) -> dict:
            import logging

            import torch
            import unsloth  # noqa: F401  (first)

            # As the train stage's actor does: the project's INFO lines (which levers are on,
            # what train.cuda_graphs captured) reach the log; run 19 had none of them.
            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )

            from vlm_ray.train.activation_checkpointing import CheckpointingReport
            from vlm_ray.train.step_profiler import StepProfiler
            from vlm_ray.train.unsloth_engine import train_unsloth

            clock, checkpointing = make_clock(), CheckpointingReport(spec.train.checkpoint_scope)
            timed = a.warmup + a.steps

            def timing() -> dict:
                return steady(
                    clock.times[:timed], a.warmup, a.batch, clock.window_s(a.warmup, timed)
                )

            # The figure exists once the timed steps are done: printed then (Ray forwards it), it
            # survives a `timeout` that cuts the run later, while it profiles or saves.
            step_losses = make_step_losses()
            callbacks = [
                clock,
                checkpointing,
                step_losses,
                make_early_result(timed, timing, checkpointing),
            ]
            # One step of its own after the timed and profiled ones (its warnings slow it).
            last = timed + profiled
            sync_sites = make_sync_sites(last) if a.sync_sites else None
            if sync_sites:
                callbacks.append(sync_sites)
            last += int(a.sync_sites)  # each diagnostic has a step of its own
            trace = Path("/tmp") / f"copy_sites_{a.shape}_bs{a.batch}.json"
            copy_sites = (
                make_copy_sites(last, trace, tuple(a.gpu_time_sites or GPU_TIME_SITES))
                if a.copy_sites
                else None
            )
            if copy_sites:
                callbacks.append(copy_sites)
            last += int(a.copy_sites)
            memory_sites = make_memory_sites(last) if a.memory_sites else None
            if memory_sites:
                callbacks.append(memory_sites)
            if a.profile_steps:  # the stage's own profiler (train.profile_steps), after the timing
                callbacks.append(StepProfiler(store, timed, a.profile_steps))
            summary = train_unsloth(
                spec, store, Path(f"/tmp/bench_stage_work_gpu{gpu}"), None, callbacks
            )
            return {
                **timing(),
                **(
                    _profile_of(store, out_dir, f"stage_{a.shape}_bs{a.batch}")
                    if a.profile_steps
                    else {}
                ),
                "peak_gib": summary["peak_gpu_memory_gib"],
                # the mean loss over every step: runs of one shape see the same batches, so it
                # compares numerics (train.fp8 against bf16), not only speed
                "train_loss": summary["train_loss"],
                "step_losses": step_losses.losses,
                # train.host_input_embedding: proof the rows came with the batch in every step;
                # train.fp8: how many base layers ran as float8 GEMMs; the label span's cut
                # forwards; train.lora_add_without_copy: how many eager LoRA adds were in place
                **{
                    k: summary[k]
                    for k in (
                        "host_input_embedding",
                        "fp8_base_layers",
                        "label_span_logits",
                        "lora_add_without_copy",
                    )
                    if k in summary
                },
                **checkpointing.summary(),
                **(sync_sites.summary() if sync_sites else {}),
                **(copy_sites.summary() if copy_sites else {}),
                **(memory_sites.summary() if memory_sites else {}),
                "gpu": torch.cuda.get_device_name(0),
            }

    ray.init(include_dashboard=False)  # local workers inherit this process's PYTHONPATH
    return ray.get(Trainer.remote().train.remote())


MODES = {
    "hf": mode_hf,
    "unsloth": mode_unsloth,
    "unsloth4": lambda a, d: mode_unsloth(a, d, load_in_4bit=True),
    "stage": mode_stage,
    "profile": mode_profile,
    "build": lambda a, d: {"built": str(build_model(a.shape, d))},
}


# --- driver ----------------------------------------------------------------------------------


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ACTOR_PREFIX = re.compile(r"^\([\w.:-]+ pid=\d+(?:, ip=[\d.]+)?\) ")


def result_of(line: str) -> dict | None:
    """The JSON of a `RESULT {...}` line, from the child itself or forwarded by Ray from an actor
    (which prefixes "(Trainer pid=N) ", colour codes included); None for any other line."""
    text = _ACTOR_PREFIX.sub("", _ANSI.sub("", line).strip())
    if not text.startswith("RESULT "):
        return None
    return json.loads(text[len("RESULT ") :])


# How long a stopped driver waits for its child before killing it (see collect_results).
STOP_GRACE_S = 2.0


class Stopped(Exception):
    """SIGTERM reached the driver: the chain's `timeout` ran out."""


def _stop(signum, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def collect_results(cmd: list[str], conditions_every: float = 2.0) -> dict:
    """Run `cmd`, echoing its output as it comes (so a cut run shows how far it got); the answer
    is its last RESULT line, or an error. If the driver is stopped (SIGTERM, with _stop installed)
    the child is stopped too and the answer is marked "cut": the last RESULT so far, or an error
    if there was none. The stage prints its timing before it saves, so a run cut while saving
    still has its figure. While it runs, a ConditionsSampler (every `conditions_every` s; 0: off)
    records the machine's load and clocks; the answer carries them over its timed steps."""
    from bench.machine_conditions import ConditionsSampler

    t = time.time()
    found = []
    timed_end = None  # when the first RESULT with a timing arrived: the timed steps' end
    sampler = ConditionsSampler(every=conditions_every).start() if conditions_every else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            print(f"  | {line}", end="", flush=True)
            result = result_of(line)
            if result is not None:
                found.append(result)
                if timed_end is None and "step_ms" in result:
                    timed_end = time.time()
        proc.wait()
    except Stopped as stop:
        proc.terminate()
        try:
            # Briefly: `timeout -k 5` (device_chains.sh's CHAIN_DEADLINE) kills this driver 5 s
            # after its SIGTERM, and the record is written after this returns. A Ray child can
            # take longer to stop than that (run 25's last row was lost to a 10 s wait here).
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        cut = f"stopped by {stop} after {round(time.time() - t)} s"
        last = found[-1] if found else {"error": "no RESULT line before the cut"}
        return {
            **last,
            **_conditions(sampler, last, timed_end),
            "cut": cut,
            "wall_s": round(time.time() - t),
        }
    finally:
        proc.stdout.close()
        if sampler:
            sampler.stop()
    if not found:
        return {"error": f"exit {proc.returncode}", "wall_s": round(time.time() - t)}
    last = found[-1]
    return {**last, **_conditions(sampler, last, timed_end), "wall_s": round(time.time() - t)}


def _conditions(sampler: ConditionsSampler | None, result: dict, timed_end: float | None) -> dict:
    """{"conditions": ...} over the timed steps (they ended when their RESULT arrived and took
    timed_steps x step_ms), or {} without a sampler or a timing."""
    if sampler is None or timed_end is None or "timed_steps" not in result:
        return {}
    start = timed_end - result["timed_steps"] * result["step_ms"] / 1e3
    return {"conditions": sampler.window(start, timed_end)}


def run_child(mode: str, argv: list[str]) -> dict:
    """Run one mode in a fresh Python process; its last RESULT line is the answer."""
    return collect_results([sys.executable, __file__, "--child", mode, *argv])


def summarise(results: dict, shape: str, gpu: str, peak: float, earlier: dict | None = None) -> str:
    """A markdown table: samples/s, peak memory, MFU, ratio to the HF baseline.

    `earlier`: results of earlier invocations in the same --out at the same shape, batch and
    image size, where the HF baseline and the model's FLOPs may come from when this one has none.
    """
    pool = {**(earlier or {}), **results}
    base = next((r.get("samples_per_s") for m, r in pool.items() if m.startswith("hf")), None)
    # The model's FLOPs, from a 16-bit mode: a 4-bit model's packed weights count half their params.
    flops = next(
        (
            r["flops_per_sample"]
            for m, r in pool.items()
            if m.startswith(("hf", "unsloth")) and "unsloth4" not in m and "flops_per_sample" in r
        ),
        None,
    )
    lines = [
        f"{shape} on {gpu}:",
        "",
        "| mode | samples/s | step ms (median, max) | peak GiB | MFU | x HF |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        sps = r.get("samples_per_s")
        mfu = f"{100 * sps * flops / peak:.1f}%" if sps and flops else "-"
        ratio = f"{sps / base:.2f}" if sps and base else "-"
        step = str(r.get("step_ms", "-"))
        if "median_step_ms" in r:
            step += f" ({r['median_step_ms']}, {r['max_step_ms']})"
        lines.append(
            f"| {mode} | {sps if sps else r.get('error', '-')} | {step} | "
            f"{r.get('peak_gib', '-')} | {mfu} | {ratio} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by tests that check bench/chains/ before device time)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="2b", choices=sorted(REAL_VOCAB))
    p.add_argument("--modes", default="hf,unsloth,stage", help="comma-separated, run in this order")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps (Unsloth compiles in them)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(
        "--big-batch", type=int, default=16, help="batch of the bare-step check in 'unsloth'"
    )
    p.add_argument("--image", type=int, default=448, help="image side in px")
    p.add_argument(
        "--gc",
        default="unsloth",
        choices=["unsloth", "true", "false"],
        help="Unsloth checkpointing",
    )
    p.add_argument("--workers", type=int, default=0, help="dataloader workers in 'stage'")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="job-spec override for 'stage', e.g. train.optim=adamw_torch_fused (repeatable)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="'stage': the stage's own profiler (train.profile_steps) over this many steps "
        "after the timed ones and one that warms it up; tables "
        "profile_stage_<shape>_bs<batch>_*.txt beside --out",
    )
    p.add_argument(
        "--sync-sites",
        action="store_true",
        help="'stage': one more step after the others with torch's CUDA sync debug mode on; "
        "the result counts the synchronising calls by their Python call site",
    )
    p.add_argument(
        "--copy-sites",
        action="store_true",
        help="'stage': one more step, profiled with Python stacks; the result counts its "
        "host-device copies and stream syncs by the Python code around them "
        "(bench/trace_sites.py), those torch's sync debug mode misses included",
    )
    p.add_argument(
        "--gpu-time-sites",
        action="append",
        default=None,
        metavar="NAME_PART",
        help="with --copy-sites: the GPU time of the kernels and copies whose names contain "
        "NAME_PART (repeatable), summed by the operators and Python code that launched them; "
        "default 'Memcpy DtoD' and 'amax' (the device-to-device copies and the float8 "
        "quantizing reductions of run 25's profile)",
    )
    p.add_argument(
        "--memory-sites",
        action="store_true",
        help="'stage': one more step with the allocator recording; the result says what was "
        "alive at the step's peak by the Python code that allocated it, and the memory held "
        "before the step by parameter group (bench/memory_sites.py)",
    )
    p.add_argument("--label", default="", help="suffix of the result keys, e.g. '[bs16]'")
    p.add_argument("--no-split", action="store_true", help="skip the bare-step checks in 'unsloth'")
    p.add_argument("--model-dir", default=None, help="default: /tmp/bench_<family>_<shape>")
    p.add_argument(
        "--out",
        default="train_speed.json",
        help='JSON {"invocations": [...]}; an existing file keeps its invocations, this one is added',
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main() -> None:
    a = build_parser().parse_args()
    model_dir = Path(a.model_dir or f"/tmp/bench_{FAMILY[a.shape]}_{a.shape}")
    sys.path.insert(0, str(REPO))

    if a.child:
        res = MODES[a.child](a, model_dir)
        print("RESULT " + json.dumps(res), flush=True)
        return

    argv = sys.argv[1:]
    # A chain's `timeout` stops the driver with SIGTERM: it then records what it has and stops.
    signal.signal(signal.SIGTERM, _stop)
    # Every mode, the build included, in its own process: the driver keeps no CUDA memory.
    built = run_child("build", argv)
    print(f"build: {json.dumps(built)}", flush=True)
    if "cut" in built:
        return
    gpu = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    gpu = gpu.splitlines()[0] if gpu else gpu  # one line per GPU on a multi-GPU machine
    results: dict[str, dict] = {}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Several invocations may share one --out (one per variant, in one device call): keep theirs.
    previous = json.loads(out.read_text()) if out.exists() else {"invocations": []}
    earlier = previous.get("invocations", [previous])  # a file from before: one bare record
    comparable = {
        mode: r
        for inv in earlier
        if (inv.get("shape"), inv.get("batch"), inv.get("image")) == (a.shape, a.batch, a.image)
        for mode, r in inv.get("results", {}).items()
    }
    for mode in a.modes.split(","):
        print(f"--- {mode} ({a.shape})", flush=True)
        key = mode + a.label
        results[key] = run_child(mode, argv)
        print(f"{key}: {json.dumps(results[key])}", flush=True)
        table = summarise(results, a.shape, gpu, peak_flops(gpu), comparable)
        record = {
            "shape": a.shape,
            "gpu": gpu,
            "date": time.strftime("%Y-%m-%d"),
            "batch": a.batch,
            "image": a.image,
            "warmup": a.warmup,
            "steps": a.steps,
            "command": " ".join(sys.argv),
            "results": results,
            "table": table,
        }
        # written after every mode, so a call cut off at its time limit keeps what it measured
        out.write_text(json.dumps({"invocations": [*earlier, record]}, indent=2) + "\n")
        if "cut" in results[key]:
            break
    print(table, flush=True)


if __name__ == "__main__":
    main()
