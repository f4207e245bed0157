"""Shared fixtures: a real local Ray cluster, a real S3-compatible server on 127.0.0.1,
and tiny random-weight models built locally — each made once per test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Never reach a model hub: every model here is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Credentials for the test S3 server only (moto accepts any).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from vlm_ray.storage import LocalStore, S3Store, Store


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests where there is no CUDA GPU (CI); they run on the GPU machine."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run on the GPU machine (see docs/gpu.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def restore_root_logging() -> Iterator[None]:
    """Undo what a test's in-process `vlm-ray` call (cli.setup_logging) does to the root logger:
    its handler writes to that test's captured stream, which is closed after the test, and the
    next test's log lines would fail on it."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto's) on 127.0.0.1, started for this session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """A bucket on the test S3 server."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="vlm-ray-test")
    return "vlm-ray-test"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same test against a local folder and against the S3 server (fresh prefix each)."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(f"s3://{bucket}/{uuid.uuid4().hex[:12]}", endpoint_url=endpoint)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A real local Ray cluster for the whole session (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(models_dir: Path) -> Path:
    """A random-weight Qwen2-VL in the normal HF layout, built once per session."""
    from vlm_ray.models.tiny import build_tiny_model

    return build_tiny_model(models_dir / "qwen2_vl", family="qwen2_vl", size="tiny")


@pytest.fixture(scope="session")
def untied_qwen2_vl(tiny_qwen2_vl: Path, models_dir: Path) -> Path:
    """The tiny Qwen2-VL with lm_head untied from the input embedding (as at 7B): a table that
    can move. The tiny one ties them, as Qwen2-VL-2B does."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = models_dir / "qwen2_vl_untied"
    if (out / "config.json").exists():
        return out
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl)
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False
    generator = torch.Generator().manual_seed(1)
    head = torch.randn(model.lm_head.weight.shape, generator=generator) * 0.02
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_qwen2_vl).save_pretrained(out)
    return out


def _with_large_random_weights(path: Path):
    """The tiny Qwen2-VL at `path` with larger random weights (seed 0), in eval mode.

    The saved tiny model's small init makes every input decode to the same tokens; larger random
    weights make the output depend on the image, so a padding or batching mistake would show.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3, generator=generator)
    return model


@pytest.fixture(scope="session")
def tiny_generator(tiny_qwen2_vl: Path):
    """(model, left-padding processor): the tiny Qwen2-VL with larger random weights, shared."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    processor.tokenizer.padding_side = "left"
    return _with_large_random_weights(tiny_qwen2_vl), processor


@pytest.fixture
def tiny_generator_on_cuda(tiny_generator, new_tiny_generator_model):
    """(a fresh copy of tiny_generator's model on the GPU, its processor); skipped without CUDA."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _, processor = tiny_generator
    return new_tiny_generator_model().to("cuda").eval(), processor


@pytest.fixture
def new_tiny_generator_model(tiny_qwen2_vl: Path):
    """A factory of fresh copies of tiny_generator's model, for tests that change a model in place."""
    return lambda: _with_large_random_weights(tiny_qwen2_vl)


def _number_png(i: int, width: int, height: int) -> bytes:
    """A real PNG: a number drawn on white."""
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(img).text((8, height // 2 - 6), str(i), fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def write_prepared():
    """Write prepared train/heldout shards as docs/architecture.md specifies: write_prepared(store, rows, ...).

    Lets train/infer tests run without the prepare stage. Rows are numbers drawn on
    patch-snapped images (56x56 and 84x56), answer = the number.
    """
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_ray import layout

    prompt = "Read the number in this image."

    def write(
        store: Store, rows: int = 8, rows_per_shard: int | None = None, heldout: int = 2
    ) -> list[dict]:
        per_shard = rows_per_shard or rows
        shards, all_recs = [], []
        for split, n, offset in (("train", rows, 0), ("heldout", heldout, rows)):
            recs = []
            for i in range(offset, offset + n):
                w, h = (84, 56) if i % 2 else (56, 56)
                messages = [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": prompt}, {"type": "image"}],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": str(100 + i)}]},
                ]
                recs.append(
                    {
                        "id": f"row-{i:04d}",
                        "source_id": str(i),
                        "image": _number_png(100 + i, w, h),
                        "width": w,
                        "height": h,
                        "prompt": prompt,
                        "system_prompt": None,
                        "text": str(100 + i),
                        "messages": json.dumps(messages),
                    }
                )
            for s, start in enumerate(range(0, len(recs), per_shard)):
                chunk = recs[start : start + per_shard]
                buf = io.BytesIO()
                pq.write_table(pa.Table.from_pylist(chunk), buf)
                key = layout.prepared_shard(split, s)
                store.write_bytes(key, buf.getvalue())
                shards.append({"split": split, "key": key, "rows": len(chunk)})
            all_recs += recs
        store.write_json(
            layout.PREPARED_MANIFEST,
            {
                "rows_in": rows + heldout,
                "rows_ok": rows + heldout,
                "rows_quarantined": 0,
                "splits": {"train": rows, "heldout": heldout},
                "shards": shards,
            },
        )
        return all_recs

    return write


@pytest.fixture(scope="session")
def tiny_train_spec():
    """A JobSpec for a few CPU training steps: tiny_train_spec(model_dir, run_uri, train={...}, ...).

    The base: short sequences, no gradient checkpointing, the 56-84 px images write_prepared
    draws; each keyword is a spec section whose keys are laid over the base's.
    """
    from vlm_ray.config import parse_spec

    def make(model_dir: str | Path, run: str | Path, **sections: dict):
        raw: dict[str, dict] = {
            "run": {"uri": str(run)},
            "model": {
                "name": str(model_dir),
                "max_seq_length": 256,
                "use_gradient_checkpointing": False,
            },
            "data": {"source": "unused", "image_min_size": 56, "image_max_size": 84},
        }
        for name, values in sections.items():
            raw[name] = {**raw.get(name, {}), **values}
        return parse_spec(raw)

    return make


@pytest.fixture
def tiny_training_run(tiny_qwen2_vl, write_prepared, tiny_train_spec, tmp_path):
    """tiny_training_run(rows, train={...}, model={...}) -> (store, result): the train stage in
    this process (no Ray) on the tiny Qwen2-VL and `rows` prepared rows, with those knobs."""
    from vlm_ray.stages.train import train_in_this_process

    def run(rows: int, train: dict, model: dict | None = None):
        store = LocalStore(tmp_path / "run")
        write_prepared(store, rows=rows)
        spec = tiny_train_spec(tiny_qwen2_vl, tmp_path / "run", train=train, model=model or {})
        return store, train_in_this_process(spec, store)

    return run


@pytest.fixture
def logged_training_run(write_prepared, tiny_train_spec, tmp_path):
    """logged_training_run(model_dir, name, rows, train={...}) -> (summary, losses): the train
    stage in this process on `rows` prepared rows under tmp_path/name, and the loss of every
    logged step (train.logging_steps: 1, no warm-up)."""
    from vlm_ray.stages.train import train_in_this_process
    from vlm_ray.train.metrics_log import read_metrics

    def run(model_dir: Path, name: str, rows: int, train: dict) -> tuple[dict, list[float]]:
        store = LocalStore(tmp_path / name)
        write_prepared(store, rows=rows)
        knobs = {"gradient_accumulation_steps": 1, "warmup_steps": 0, "logging_steps": 1, **train}
        summary = train_in_this_process(
            tiny_train_spec(model_dir, tmp_path / name, train=knobs), store
        )
        return summary, [row["loss"] for row in read_metrics(store) if "loss" in row]

    return run


@pytest.fixture(params=["hf", "unsloth"])
def train_engine(request) -> str:
    """Each train engine in turn (test ids [hf], [unsloth]); Unsloth's turn is skipped where
    Unsloth is not installed. For the GPU tests that run the train stage through both."""
    if request.param == "unsloth":
        pytest.importorskip("unsloth")
    return request.param


@pytest.fixture(scope="session")
def lora_model():
    """lora_model(model_dir, dtype=None, **lora) -> a PEFT model: LoRA r=4 on every linear layer
    of the model in model_dir (`lora`: other or more LoraConfig keys), its adapter drawn from
    seed 0, so two calls give the same model."""

    def make(model_dir: Path, dtype=None, **lora):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForImageTextToText

        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, **({"dtype": dtype} if dtype is not None else {})
        )
        config = LoraConfig(**{"r": 4, "target_modules": "all-linear", **lora})
        return get_peft_model(model, config)

    return make


@pytest.fixture(scope="session")
def sft_collator():
    """sft_collator(model_dir, dtype=None) -> the project's VisionSFTCollator for that model
    (responses only, 256 tokens at most); `dtype` is the pixel values' dtype."""

    def make(model_dir: Path, dtype=None):
        from transformers import AutoProcessor

        from vlm_ray.models.families import family_of
        from vlm_ray.train.collator import VisionSFTCollator

        return VisionSFTCollator(
            AutoProcessor.from_pretrained(model_dir),
            family_of(model_dir),
            train_on_responses_only=True,
            max_seq_length=256,
            dtype=dtype,
        )

    return make


@pytest.fixture(scope="session")
def two_sft_examples():
    """two_sft_examples() -> two fresh chat rows for a collator, images of two sizes."""

    def make() -> list[dict]:
        from PIL import Image

        rows = []
        for i, size in enumerate([(56, 56), (84, 56)]):
            image = Image.new("RGB", size, (40 * i, 200, 90))
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Read it."}, {"type": "image"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": str(100 + i)}]},
            ]
            rows.append({"id": f"r{i}", "messages": messages, "images": [image]})
        return rows

    return make


@pytest.fixture(scope="session")
def loss_and_lora_grads():
    """loss_and_lora_grads(model, batch) -> (loss, {name: gradient}) of one forward + backward,
    with every gradient the backward produced (under LoRA: the adapters')."""

    def run(model, batch: dict):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    return run


@pytest.fixture(scope="session")
def quick_demo_overrides(
    tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_vl: Path
) -> list[str]:
    """Overrides that shrink examples/demo.yaml to a few-second run on 2 CPUs (40 digits, 2 steps)."""
    from vlm_ray.demo_data import write_digits_dataset

    data = write_digits_dataset(tmp_path_factory.mktemp("digits"), limit=40)
    return [
        f"model.name={tiny_qwen2_vl}",
        f"data.source={data}",
        "data.heldout_fraction=0.25",
        "data.rows_per_shard=20",
        "train.max_steps=2",
        "train.per_device_train_batch_size=4",
        "train.warmup_steps=0",
        "generation.max_new_tokens=2",
        "generation.batch_size=8",
    ]
