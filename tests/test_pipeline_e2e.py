"""End to end: the demo pipeline on a real local Ray cluster, against a folder and a real S3 server.

prepare (Ray tasks) → train (a Ray actor, CPU engine) → infer (a pool of Ray actors)
→ evaluate, on a small slice of the demo's digits and the demo's tiny Qwen2-VL.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from vlm_ray import layout
from vlm_ray.config import JobSpec, load_spec
from vlm_ray.demo_data import write_digits_dataset
from vlm_ray.models.tiny import build_tiny_model
from vlm_ray.run_status import run_status
from vlm_ray.storage import open_store

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def demo_slice(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> dict[str, Path]:
    """240 real digits and the demo's small model, built once."""
    data = write_digits_dataset(tmp_path_factory.mktemp("digits"), limit=240)
    model = build_tiny_model(models_dir / "qwen2_vl_small", family="qwen2_vl", size="small")
    return {"data": data, "model": model}


def _spec(run_uri: str, assets: dict[str, Path], *extra: str) -> JobSpec:
    return load_spec(
        ROOT / "examples/demo.yaml",
        [
            f"run.uri={run_uri}",
            f"model.name={assets['model']}",
            f"data.source={assets['data']}",
            "data.rows_per_shard=80",
            "data.heldout_fraction=0.2",
            "train.per_device_train_batch_size=8",
            "train.num_train_epochs=6",
            "train.save_steps=20",
            "train.logging_steps=5",
            *extra,
        ],
    )


def _check_run(spec: JobSpec, results: dict) -> None:
    store = open_store(spec.run.uri, spec.run.s3_endpoint_url)
    manifest = store.read_json(layout.PREPARED_MANIFEST)
    assert manifest["rows_in"] == 240
    assert manifest["rows_ok"] + manifest["rows_quarantined"] == manifest["rows_in"]
    assert store.exists(layout.SPEC)
    info = store.read_json(layout.MODEL_INFO)
    assert store.exists(f"{info['path']}/config.json") or store.exists(
        f"{info['path']}/adapter_config.json"
    )
    metrics = store.read_json(layout.EVAL_METRICS)
    heldout = metrics["rows"]
    assert heldout > 20
    base, tuned = metrics["models"]["base"], metrics["models"]["finetuned"]
    for m in (base, tuned):
        assert 0.0 <= m["exact_match"] <= 1.0 and m["cer"] >= 0.0 and m["wer"] >= 0.0
    # A random-weight base model cannot read digits; a few epochs of fine-tuning must help.
    assert tuned["cer"] < base["cer"]
    assert tuned["exact_match"] > base["exact_match"]
    assert store.exists(layout.EVAL_REPORT)
    for tag in ("base", "finetuned"):
        rows = sum(
            store.read_text(k).count("\n")
            for k in store.list(layout.predictions_dir(tag))
            if k.endswith(".jsonl") and "/_done/" not in k
        )
        assert rows == heldout, f"{tag}: every held-out row predicted exactly once"
    # `vlm-ray status` reads the same run back from storage alone: every stage done.
    status = run_status(spec)
    assert [(s["stage"], s["state"]) for s in status["stages"]] == [
        ("prepare", "done"),
        ("train", "done"),
        ("infer", "done"),
        ("evaluate", "done"),
    ]
    infer = status["stages"][2]["facts"]["models"]
    assert infer["finetuned"]["rows"] == infer["base"]["rows"] == heldout


def test_demo_pipeline_on_a_local_folder(
    ray_cluster: None, demo_slice: dict[str, Path], tmp_path: Path
) -> None:
    from vlm_ray.pipeline import run_pipeline

    spec = _spec(str(tmp_path / "run"), demo_slice)
    results = run_pipeline(spec)
    _check_run(spec, results)
    # Re-running the same spec finds everything committed: nothing duplicated, same metrics.
    first = open_store(spec.run.uri).read_json(layout.EVAL_METRICS)
    run_pipeline(spec)
    again = open_store(spec.run.uri).read_json(layout.EVAL_METRICS)
    assert again["models"] == first["models"]


def test_demo_pipeline_on_s3(
    ray_cluster: None, demo_slice: dict[str, Path], s3_endpoint: str, s3_bucket: str
) -> None:
    from vlm_ray.pipeline import run_pipeline

    spec = _spec(
        f"s3://{s3_bucket}/runs/{uuid.uuid4().hex[:8]}",
        demo_slice,
        f"run.s3_endpoint_url={s3_endpoint}",
    )
    results = run_pipeline(spec)
    _check_run(spec, results)


def test_pipeline_with_infer_source_captions_every_image_and_skips_evaluation(
    ray_cluster: None, demo_slice: dict[str, Path], tmp_path: Path
) -> None:
    """Bulk captioning: train, then caption a folder of unlabeled images; a broken file is an error record."""
    from vlm_ray.pipeline import run_pipeline
    from vlm_ray.stages.infer import bulk_job

    images = tmp_path / "incoming"
    images.mkdir()
    for i in range(5):
        (images / f"scan-{i}.png").write_bytes(
            (demo_slice["data"].parent / f"images/{i:04d}.png").read_bytes()
        )
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    spec = _spec(
        str(tmp_path / "run"),
        demo_slice,
        "train.max_steps=2",
        f"infer.source={images}",
        "infer.format=imagefolder",
        "infer.models=[finetuned]",
    )
    results = run_pipeline(spec)
    assert "evaluate" not in results
    store = open_store(spec.run.uri)
    assert not store.exists(layout.EVAL_METRICS)
    job = bulk_job(spec)
    assert results["infer"]["predictions"] == store.uri_of(f"bulk/{job}/predictions")
    records = [
        json.loads(line)
        for key in store.list(layout.predictions_dir("finetuned", job))
        if key.endswith(".jsonl") and "/_done/" not in key
        for line in store.read_text(key).splitlines()
    ]
    assert sorted(Path(r["source_id"]).name for r in records) == [
        "broken.png",
        *[f"scan-{i}.png" for i in range(5)],
    ]
    errors = [r for r in records if r["error"]]
    assert [Path(r["source_id"]).name for r in errors] == ["broken.png"]
    assert all(r["prediction"] is not None for r in records if not r["error"])
