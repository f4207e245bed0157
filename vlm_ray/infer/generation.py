"""Batched generation over one table of prepared rows: left padding, batches of similar image size.

Rows are decoded (several threads) and run through the processor (on the model's GPU when it can)
one batch ahead, so image decoding and preprocessing overlap with generation on the device. On
a GPU the processor's work goes to a CUDA stream of its own (preprocess_stream). A row whose
image cannot be decoded, or whose batch cannot be generated even alone, gets an error record
instead of a prediction; the other rows go on.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from vlm_ray.config import GenerationSpec
from vlm_ray.data.chat import to_messages
from vlm_ray.models.families import family_by_name

log = logging.getLogger(__name__)


def generation_kwargs(gen: GenerationSpec) -> dict[str, Any]:
    """model.generate keyword arguments from spec.generation (sampling knobs only when do_sample)."""
    kwargs: dict[str, Any] = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample}
    if gen.repetition_penalty is not None:
        kwargs["repetition_penalty"] = gen.repetition_penalty
    if gen.cache_implementation is not None:
        kwargs["cache_implementation"] = gen.cache_implementation
    if gen.max_cache_len is not None:
        kwargs["max_cache_len"] = gen.max_cache_len
    if gen.do_sample:
        kwargs["temperature"] = gen.temperature
        if gen.min_p is not None:
            kwargs["min_p"] = gen.min_p
        if gen.top_p is not None:
            kwargs["top_p"] = gen.top_p
    else:
        # Greedy: clear sampling defaults a model's generation_config may carry (they only warn).
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def prompt_messages(row: dict[str, Any]) -> list[dict]:
    """The row's chat turns without the assistant's answer (what the model was trained to continue)."""
    if row.get("messages"):
        turns = json.loads(row["messages"])
        return [t for t in turns if t.get("role") != "assistant"]
    return to_messages(row["prompt"], None, row.get("system_prompt"))


def size_key(row: dict[str, Any]) -> tuple[int, int]:
    """A row's batching key: same pixel count -> same number of image tokens; then the prompt's length."""
    return image_pixels(row), len(row["prompt"] or "")


def size_batches(keys: list[tuple], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar size (sorted by key): fewer pad tokens per batch."""
    order = sorted(range(len(keys)), key=lambda i: (keys[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class Generated:
    """One row's output."""

    text: str
    tokens: int
    ids: list[int]  # the new token ids, up to and including the stop token


def _decode_image(data: bytes) -> Any:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # decode now, so a truncated file fails here and not inside the processor
    return img.convert("RGB")


def try_decode_image(data: bytes) -> Any:
    """The decoded RGB image, or a DecodeError with the sentence for the row's error record."""
    try:
        return _decode_image(data)
    except Exception as err:  # PIL raises many types for bad bytes; the row records which
        return DecodeError(f"image could not be decoded: {err}")


@dataclass(frozen=True)
class DecodeError:
    """Why a row's image bytes could not be decoded."""

    message: str


def image_pixels(row: dict[str, Any]) -> int:
    """Width x height of a row's image for batching: prepare's columns, else the file's header."""
    if row.get("width") and row.get("height"):
        return int(row["width"]) * int(row["height"])
    from PIL import Image

    try:
        width, height = Image.open(io.BytesIO(row["image"])).size  # header only, no decoding
    except Exception:
        return 0  # the row fails again when it is decoded, and gets its error record then
    return width * height


def processor_device(model: Any, processor: Any) -> Any:
    """Where the image processor should run: the model's GPU when the processor can (torchvision backend)."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # transformers before the backends split: keep the processor's default
        return None

    device = getattr(model, "device", None)
    image_processor = getattr(processor, "image_processor", None)
    if device is None or device.type != "cuda":
        return None
    return device if isinstance(image_processor, TorchvisionBackend) else None


def prepare_inputs(
    processor: Any, images: list[Any], messages: list[list[dict]], device: Any = None
) -> Any:
    """Processor output for one batch: chat template with the generation prompt, left padded.

    device: run the image processor there (resize, normalise, patchify on the GPU instead of
    ~4 ms of CPU per image), its images uploaded by upload_images; None for the processor's
    default.
    """
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    if device is not None:
        images = upload_images(images, device)
    # The chat templates of Llama 3.2 Vision, Gemma 3 and Mistral 3 write BOS themselves; a second
    # one from the tokenizer is a prompt the model never saw in training (train/collator.py).
    return processor(
        text=texts,
        images=[[img] for img in images],
        padding=True,
        return_tensors="pt",
        add_special_tokens=False,
        **({"device": device} if device is not None else {}),
    )


def upload_images(images: list[Any], device: Any) -> list[Any]:
    """RGB images as channels-first uint8 tensors on `device`, one copy per group of equal size.

    Given PIL images, the torchvision processor copies each one to the device on its own and
    waits for it: ~1,024 synchronising copies per batch of 512 (inference run 13). Stacked per
    size into one (pinned, on CUDA) host buffer, a group is one asynchronous copy; the
    processor takes the tensors as they are (same pixels, so the same output).
    """
    import numpy as np
    import torch

    device = torch.device(device)
    pin = device.type == "cuda"
    arrays = [np.asarray(img.convert("RGB") if img.mode != "RGB" else img) for img in images]
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, arr in enumerate(arrays):
        groups.setdefault(arr.shape, []).append(k)
    out: list[Any] = [None] * len(images)
    for shape, members in groups.items():
        host = torch.empty((len(members), *shape), dtype=torch.uint8, pin_memory=pin)
        for row, k in enumerate(members):
            host[row].numpy()[...] = arrays[k]  # PIL's arrays are read-only: no from_numpy
        on_device = host.to(device, non_blocking=pin).permute(0, 3, 1, 2).contiguous()
        for row, k in enumerate(members):
            out[k] = on_device[row]
    return out


def stop_token_ids(model: Any, processor: Any) -> list[int]:
    """Every token that ends an answer: the generation_config's eos ids, the tokenizer's eos, the family's stop tokens."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    tok = processor.tokenizer
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    # The family's own list too: a generation_config saved after training may have been reset
    # to the tokenizer's eos alone (Gemma 3 then talks on past <end_of_turn>).
    try:
        family = family_by_name(model.config.model_type)
    except ValueError:
        return sorted(ids)  # outside the family table: the model's own eos ids are all we know
    for token in family.stop_tokens:
        token_id = tok.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tok.unk_token_id:
            ids.add(token_id)
    return sorted(ids)


def generate_batch(model: Any, processor: Any, inputs: Any, gen_kwargs: dict) -> list[Generated]:
    """Generate for one batch until a stop token (stop_token_ids); decode only the new tokens, stripped."""
    import torch

    inputs = inputs.to(model.device)
    stop = stop_token_ids(model, processor)
    with torch.inference_mode(), phase("generate"):
        out = model.generate(**inputs, **{"eos_token_id": stop, **gen_kwargs})
    with phase("decode_text"):
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        results = []
        for ids in new:
            # tokens: up to and including the first stop token (what follows it is padding)
            n = next((i + 1 for i, t in enumerate(ids) if t in stop), len(ids))
            text = processor.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            results.append(Generated(text, n, ids[:n]))
    return results


def phase(name: str) -> AbstractContextManager:
    """A `vlm_ray.<name>` range for torch.profiler (a few microseconds when none runs).

    bench/device_timeline.py sums the GPU's idle time by these ranges: which step of ours the
    GPU waited on.
    """
    from torch.profiler import record_function

    return record_function(f"vlm_ray.{name}")


DECODE_THREADS = 4  # PIL releases the GIL while decoding: a few threads decode a batch in parallel


@dataclass
class _Prepared:
    """One batch after decoding and the processor: the rows that made it, and why the others did not."""

    images: dict[int, Any]  # the rows whose image decoded, in batch order
    errors: dict[int, str]
    inputs: Any = None
    failure: Exception | None = None  # the processor failed on the whole batch
    # The CUDA event after the processor's work on its own stream; None: nothing to wait for.
    ready: Any = None

    @property
    def ok(self) -> list[int]:
        return list(self.images)


# On its own stream the processor's work never waits behind generation's queued kernels. Run 13
# suspected those waits of idling the GPU; with the images uploaded once per size (upload_images)
# they were few, and the A/B of inference run 14 measured no difference (143.4 against 141.7
# images/s). Kept: it costs nothing and keeps the two threads' GPU work apart. Off (False) only
# for the benchmark's A/B.
SIDE_STREAM = True


def preprocess_stream(device: Any) -> Any:
    """A CUDA stream for the processor's work when it runs on a GPU (and SIDE_STREAM), else None."""
    if not SIDE_STREAM or getattr(device, "type", None) != "cuda":
        return None
    import torch

    return torch.cuda.Stream(device)


def _prepare_batch(
    batch: list[int],
    rows: list[dict],
    processor: Any,
    device: Any,
    decoders: ThreadPoolExecutor,
    stream: Any = None,
) -> _Prepared:
    with phase("decode_images"):
        decoded = dict(
            zip(
                batch,
                decoders.map(try_decode_image, [rows[i]["image"] for i in batch]),
                strict=True,
            )
        )
    prepared = _Prepared(
        images={i: d for i, d in decoded.items() if not isinstance(d, DecodeError)},
        errors={i: d.message for i, d in decoded.items() if isinstance(d, DecodeError)},
    )
    if prepared.images:
        try:
            with _on_stream(stream), phase("processor"):
                prepared.inputs = prepare_inputs(
                    processor,
                    list(prepared.images.values()),
                    [prompt_messages(rows[i]) for i in prepared.images],
                    device,
                )
                if stream is not None:
                    prepared.ready = stream.record_event()
        except Exception as err:  # retried row by row, so one bad row cannot fail the batch
            prepared.failure = err
    return prepared


def _on_stream(stream: Any) -> AbstractContextManager:
    if stream is None:
        return nullcontext()
    import torch

    return torch.cuda.stream(stream)


def _hand_over(prepared: _Prepared, device: Any) -> None:
    """Make the processor's output safe to use on generation's stream (the current one).

    Generation waits for the processor's event, and each CUDA tensor is marked as used there,
    so the caching allocator does not hand its memory to the processor's next batch while
    generation still reads it.
    """
    if prepared.ready is None:
        return
    import torch

    current = torch.cuda.current_stream(device)
    current.wait_event(prepared.ready)
    for value in prepared.inputs.values():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            value.record_stream(current)


def predict_table(
    model: Any,
    processor: Any,
    table: pa.Table,
    gen: GenerationSpec,
    gpu_lock: AbstractContextManager | None = None,
) -> list[dict[str, Any]]:
    """One prediction record per row, in the table's order (schema: docs/architecture.md).

    The next batch is decoded and preprocessed in worker threads while the current one
    generates. gpu_lock, when given, is held around each generate call, so that an actor
    running several shards at once (pool.InferActor) overlaps their preparation but never
    their generation.
    """
    rows = table.to_pylist()
    records: list[dict[str, Any] | None] = [None] * len(rows)
    keys = [size_key(row) for row in rows]
    batches = size_batches(keys, gen.batch_size)
    gen_kwargs = generation_kwargs(gen)
    device = processor_device(model, processor)
    lock = gpu_lock if gpu_lock is not None else nullcontext()
    stream = preprocess_stream(device)

    with (
        ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode") as decoders,
        ThreadPoolExecutor(1, thread_name_prefix="preprocess") as preprocess,
    ):

        def submit(b: int) -> Future | None:
            if b >= len(batches):
                return None
            return preprocess.submit(
                _prepare_batch, batches[b], rows, processor, device, decoders, stream
            )

        pending = submit(0)
        for b in range(len(batches)):
            assert pending is not None
            with phase("wait_for_prepared"):
                prepared = pending.result()
            pending = submit(b + 1)
            for i, message in prepared.errors.items():
                records[i] = _record(rows[i], None, 0.0, message)
            if not prepared.ok:
                continue
            with ExitStack() as holding:
                with phase("wait_for_gpu"):
                    holding.enter_context(lock)
                # Seeded per batch from its rows: the same rows sample the same way on a re-run,
                # whatever else this process generated in between.
                torch_seed(gen.seed, [rows[i]["id"] for i in prepared.ok])
                if prepared.failure is None:
                    _hand_over(prepared, device)
                    outcome = _generate_or_split(
                        model, processor, rows, prepared, gen_kwargs, device
                    )
                else:
                    outcome = _one_by_one(
                        model,
                        processor,
                        rows,
                        prepared.images,
                        prepared.ok,
                        gen_kwargs,
                        prepared.failure,
                        device,
                    )
            for i, rec in outcome.items():
                records[i] = rec
    return [r for r in records if r is not None]


def torch_seed(seed: int, ids: list[str]) -> None:
    """Seed torch from the spec's seed and a batch's row ids."""
    import torch

    digest = hashlib.sha256(json.dumps([seed, ids]).encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _generate_or_split(
    model: Any,
    processor: Any,
    rows: list[dict],
    prepared: _Prepared,
    gen_kwargs: dict,
    device: Any,
) -> dict[int, dict]:
    start = time.perf_counter()
    try:
        outs = generate_batch(model, processor, prepared.inputs, gen_kwargs)
    except Exception as err:
        return _one_by_one(
            model, processor, rows, prepared.images, prepared.ok, gen_kwargs, err, device
        )
    latency = time.perf_counter() - start
    return {i: _record(rows[i], out, latency) for i, out in zip(prepared.ok, outs, strict=True)}


def _one_by_one(
    model: Any,
    processor: Any,
    rows: list[dict],
    images: dict[int, Any],
    batch: list[int],
    gen_kwargs: dict,
    err: Exception,
    device: Any = None,
) -> dict[int, dict]:
    """A failed batch is retried row by row, so one bad row cannot take its batch down with it."""
    if len(batch) > 1:
        log.warning(
            "infer: a batch of %d failed (%s); retrying its rows one by one", len(batch), err
        )
    out: dict[int, dict] = {}
    for i in batch:
        start = time.perf_counter()
        try:
            inputs = prepare_inputs(processor, [images[i]], [prompt_messages(rows[i])], device)
            (gen,) = generate_batch(model, processor, inputs, gen_kwargs)
            out[i] = _record(rows[i], gen, time.perf_counter() - start)
        except Exception as row_err:
            out[i] = _record(
                rows[i], None, 0.0, f"generation failed: {type(row_err).__name__}: {row_err}"
            )
    return out


def _record(
    row: dict[str, Any], gen: Generated | None, latency_s: float, error: str | None = None
) -> dict[str, Any]:
    # latency_s: wall time of the generate call that produced the row (shared by its batch)
    return {
        "id": row["id"],
        "source_id": row["source_id"],
        "prompt": row["prompt"],
        "prediction": gen.text if gen else None,
        "reference": row.get("text"),
        "tokens": gen.tokens if gen else 0,
        "latency_s": round(latency_s, 4),
        "error": error,
    }
