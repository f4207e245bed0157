"""The infer stage on a real local Ray cluster: every input predicted exactly once, on a folder and on a
real S3 server; resume after a re-run; a SIGKILLed actor is replaced and its shard redone."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from test_infer_loading import infer_spec, write_random_adapter

from vlm_ray import layout
from vlm_ray.ledger import ShardLedger
from vlm_ray.storage import LocalStore, S3Store, Store


def _predictions(store: Store, tag: str, job: str | None = None) -> list[dict]:
    rows = []
    for key in store.list(layout.predictions_dir(tag, job)):
        if key.endswith(".jsonl") and "/_done/" not in key:
            rows += [json.loads(line) for line in store.read_text(key).splitlines()]
    return rows


def _spec_for(store: Store, model, tmp_path, **sections):
    endpoint = store.endpoint_url if isinstance(store, S3Store) else None
    return infer_spec(store.uri, model, endpoint, **sections)


def test_every_heldout_row_is_predicted_once_per_model_and_a_rerun_redoes_only_uncommitted_shards(
    ray_cluster, store, write_prepared, tiny_qwen2_vl, tmp_path
):
    from vlm_ray.stages.infer import run_infer

    recs = write_prepared(store, rows=2, heldout=6, rows_per_shard=2)
    heldout = {r["id"]: r for r in recs[2:]}
    write_random_adapter(store, tiny_qwen2_vl, tmp_path / "work")
    spec = _spec_for(store, tiny_qwen2_vl, tmp_path)

    result = run_infer(spec)
    for tag in ("base", "finetuned"):
        rows = _predictions(store, tag)
        assert sorted(r["id"] for r in rows) == sorted(heldout), f"{tag}: each row exactly once"
        for r in rows:
            assert r["reference"] == heldout[r["id"]]["text"]
            assert r["prompt"] == heldout[r["id"]]["prompt"] and r["error"] is None
            assert 0 < r["tokens"] <= 4 and r["latency_s"] > 0
        manifest = store.read_json(f"{layout.predictions_dir(tag)}/manifest.json")
        assert manifest == result["models"][tag]
        assert (manifest["rows"], len(manifest["shards"]), manifest["shards_run"]) == (6, 3, 3)
        assert sum(a["shards"] for a in manifest["actors"].values()) == 3, (
            "every shard run, by actor"
        )
        assert all(a["gpu_peak_gib"] is None for a in manifest["actors"].values()), "no GPU here"
    assert result["models"]["finetuned"]["model"]["adapter_uri"] == store.uri_of(layout.ADAPTER)

    # Lose one shard's commit (as if its actor died after writing the file): only it is redone.
    ledger = ShardLedger(store, layout.predictions_dir("base"))
    before = {r["shard_id"]: r["committed_at"] for r in ledger.records()}
    store.delete(f"{layout.predictions_dir('base')}/_done/shard-00001.json")
    again = run_infer(spec, models=["base"])["models"]["base"]
    assert (again["shards_run"], again["shards_skipped"]) == (1, 2)
    after = {r["shard_id"]: r["committed_at"] for r in ledger.records()}
    assert after["shard-00000"] == before["shard-00000"]
    assert after["shard-00001"] > before["shard-00001"]
    assert sorted(r["id"] for r in _predictions(store, "base")) == sorted(heldout)

    # Other generation settings on the same predictions are refused, not mixed in.
    changed = spec.model_copy(deep=True)
    changed.generation.max_new_tokens = 9
    with pytest.raises(RuntimeError, match=r"predictions/base holds predictions made with another"):
        run_infer(changed, models=["base"])


def test_killing_an_actor_mid_run_still_predicts_every_row_exactly_once(
    ray_cluster, write_prepared, tiny_qwen2_vl, tmp_path
):
    from vlm_ray.stages.infer import run_infer

    store = LocalStore(tmp_path / "run")
    recs = write_prepared(store, rows=2, heldout=16, rows_per_shard=2)
    spec = _spec_for(
        store,
        tiny_qwen2_vl,
        tmp_path,
        generation={"max_new_tokens": 8, "batch_size": 2},
        ray={"pool_size": 2, "max_retries": 2},
    )
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = run_infer(spec, models=["base"])
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    done = store.local_path(f"{layout.predictions_dir('base')}/_done")
    deadline = time.time() + 120
    while time.time() < deadline and not (done.is_dir() and any(done.glob("*.json"))):
        time.sleep(0.05)
    first = json.loads(next(done.glob("*.json")).read_text())
    os.kill(first["pid"], signal.SIGKILL)  # a real kill of the actor's process, mid-run
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")

    rows = _predictions(store, "base")
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in recs[2:])
    records = ShardLedger(store, layout.predictions_dir("base")).records()
    assert len(records) == 8
    restarted = [r for r in records if r["actor_restarted"]]
    assert restarted, "the killed actor was restarted and predicted shards"
    assert {r["pid"] for r in restarted}.isdisjoint({first["pid"]})
    assert outcome["result"]["models"]["base"]["rows"] == 16


def test_any_image_folder_is_captioned_and_each_unreadable_file_is_an_error_record_with_its_reason(
    ray_cluster, tiny_qwen2_vl, tmp_path
):
    from PIL import Image

    from vlm_ray.stages.infer import bulk_job, run_infer

    folder = tmp_path / "images"
    folder.mkdir()
    # Sorted, two rows a shard: shard-00000 holds only the two broken files, so prepare writes
    # no parquet shard for it, only its quarantine file.
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "empty.png").write_bytes(b"")
    for i, size in enumerate([(320, 320), (400, 300), (300, 400)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"img{i}.png")
    store = LocalStore(tmp_path / "run")
    spec = _spec_for(
        store,
        tiny_qwen2_vl,
        tmp_path,
        infer={"source": str(folder), "prompt": "Caption this image.", "rows_per_shard": 2},
        data={"image_min_size": 56, "image_max_size": 112},
    )
    job = bulk_job(spec)
    result = run_infer(spec, models=["base"])
    rows = _predictions(store, "base", job)
    by_name = {r["source_id"].rsplit("/", 1)[-1]: r for r in rows}
    assert sorted(by_name) == ["broken.png", "empty.png", "img0.png", "img1.png", "img2.png"]
    assert len(rows) == 5, "each input row exactly once"
    assert all(r["prompt"] == "Caption this image." and r["reference"] is None for r in rows)
    assert all(by_name[f"img{i}.png"]["error"] is None for i in range(3))

    reasons = {
        q["source_id"].rsplit("/", 1)[-1]: q["reason"]
        for key in store.list(f"{layout.bulk_input(job)}/quarantine/")
        for q in map(json.loads, store.read_text(key).splitlines())
    }
    assert sorted(reasons) == ["broken.png", "empty.png"]
    for name, reason in reasons.items():
        bad = by_name[name]
        assert (bad["prediction"], bad["tokens"], bad["error"]) == (None, 0, reason)
        assert bad["id"] and bad["id"] not in {by_name[f"img{i}.png"]["id"] for i in range(3)}
    out = layout.predictions_dir("base", job)
    shard0 = store.read_text(f"{out}/shard-00000.jsonl").splitlines()
    names = sorted(json.loads(line)["source_id"].rsplit("/", 1)[-1] for line in shard0)
    assert names == ["broken.png", "empty.png"], "an all-quarantined shard has its predictions file"
    assert ShardLedger(store, out).is_done("shard-00000")

    manifest = result["models"]["base"]
    prepared = store.read_json(f"{layout.bulk_input(job)}/manifest.json")
    assert manifest["input"].endswith(f"bulk/{job}/input/all")
    assert (manifest["job"], manifest["source"]) == (job, str(folder))
    assert manifest["rows"] == prepared["rows_in"] == 5 and manifest["errors"] == 2
    assert manifest["input_quarantined"] == 2


def test_a_bulk_job_is_named_after_its_source_s_last_part_and_a_hash_of_the_whole():
    from vlm_ray.stages.infer import job_name_for

    name = job_name_for("s3://bucket/scans/2026-11/")
    assert name.startswith("2026-11-") and len(name) == len("2026-11-") + 8
    assert job_name_for("s3://bucket/scans/2026-11") == name, "a trailing slash changes nothing"
    assert job_name_for("s3://other/scans/2026-11/") != name
    assert job_name_for("/data/My Photos (2026)").startswith("My-Photos-2026-")
    assert job_name_for("hf://").startswith("source-")
    assert job_name_for("s3://bucket/batches/2026-11.parquet").startswith("2026-11-")
    assert job_name_for("/data/v1.2").startswith("v1.2-"), "only a data file's suffix goes"


def test_a_run_captions_each_source_in_a_bulk_job_of_its_own_beside_its_heldout_predictions(
    ray_cluster, write_prepared, tiny_qwen2_vl, tmp_path
):
    from PIL import Image

    from vlm_ray.run_status import run_status
    from vlm_ray.stages.infer import bulk_job, run_infer

    store = LocalStore(tmp_path / "run")
    recs = write_prepared(store, rows=2, heldout=2, rows_per_shard=2)
    heldout_spec = _spec_for(store, tiny_qwen2_vl, tmp_path)
    run_infer(heldout_spec, models=["base"])
    sources = {}
    for name in ("scans", "more-scans"):
        sources[name] = tmp_path / name / "2026-11"
        sources[name].mkdir(parents=True)
        Image.new("RGB", (64, 64), "white").save(sources[name] / f"{name}.png")
    specs = {
        name: _spec_for(store, tiny_qwen2_vl, tmp_path, infer={"source": str(folder)})
        for name, folder in sources.items()
    }

    jobs = {name: bulk_job(spec) for name, spec in specs.items()}
    assert jobs["scans"] != jobs["more-scans"], "two sources ending alike: two jobs"
    assert all(job.startswith("2026-11-") for job in jobs.values())
    for name, spec in specs.items():
        run_infer(spec, models=["base"])
        (row,) = _predictions(store, "base", jobs[name])
        assert row["source_id"] == f"{name}.png", "each job predicts its own source"
    assert sorted(r["id"] for r in _predictions(store, "base")) == sorted(
        r["id"] for r in recs[2:]
    ), "the held-out predictions, which evaluate scores, are untouched"

    again = run_infer(specs["scans"], models=["base"])["models"]["base"]
    assert (again["shards_run"], again["shards_skipped"]) == (0, 1), "the same source resumes"

    # `vlm-ray status` of the run (no infer.source given) lists both jobs.
    (bulk,) = [s for s in run_status(heldout_spec)["stages"] if s["stage"] == "bulk"]
    assert bulk["state"] == "done"
    assert bulk["detail"].startswith("2 jobs, 2 done (2 rows predicted) -> ")
    assert bulk["facts"]["jobs"] == {
        job: {"base": {"shards_done": 1, "shards": 1, "rows": 1, "errors": 0}}
        for job in jobs.values()
    }
    store.delete(f"{layout.predictions_dir('base', jobs['scans'])}/_done/shard-00000.json")
    (bulk,) = [s for s in run_status(heldout_spec)["stages"] if s["stage"] == "bulk"]
    assert bulk["state"] == "partial"
    assert f" | {jobs['scans']}: base 0/1 shards, 0 rows (0 errors) -> " in bulk["detail"]

    named = _spec_for(
        store, tiny_qwen2_vl, tmp_path, infer={"source": str(sources["scans"]), "job": "nov"}
    )
    assert bulk_job(named) == "nov"
    other = _spec_for(
        store, tiny_qwen2_vl, tmp_path, infer={"source": str(sources["more-scans"]), "job": "nov"}
    )
    run_infer(named, models=["base"])
    with pytest.raises(ValueError, match=r"bulk/nov/input: .*use another infer.job or run.uri"):
        run_infer(other, models=["base"])


def test_float8_weights_and_other_kernels_make_other_predictions_but_batch_size_and_compilation_do_not(
    tmp_path,
):
    from vlm_ray.infer.loading import ModelRef
    from vlm_ray.stages.infer import predictions_fingerprint

    ref = ModelRef("base", "org/model")

    def fingerprint(**sections) -> str:
        spec = infer_spec(str(tmp_path / "run"), "org/model", **sections)
        return predictions_fingerprint(spec, ref, "prepared/heldout")

    plain = fingerprint()
    assert fingerprint(generation={"batch_size": 64}) == plain
    assert fingerprint(infer={"compile_vision": True}) == plain
    assert fingerprint(infer={"fp8": "off"}) == plain
    assert (
        len({plain, fingerprint(infer={"fp8": "vision"}), fingerprint(infer={"fp8": "all"})}) == 3
    )
    # Per-tensor float8 scales and cuDNN's attention kernel round differently; the defaults
    # keep the fingerprints that folders written before these settings existed carry.
    assert fingerprint(infer={"fp8_scaling": "tensor"}) == plain, "no float8: nothing scaled"
    assert fingerprint(infer={"fp8": "vision", "fp8_scaling": "tensor"}) != fingerprint(
        infer={"fp8": "vision"}
    )
    assert fingerprint(infer={"vision_attention": "cudnn"}) != plain


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks clusters without GPUs")
def test_float8_on_a_cluster_without_gpus_fails_before_any_actor_starts(
    ray_cluster, write_prepared, tiny_qwen2_vl, tmp_path
):
    from vlm_ray.stages.infer import run_infer

    store = LocalStore(tmp_path / "run")
    write_prepared(store, rows=2, heldout=2, rows_per_shard=2)
    spec = infer_spec(store.uri, tiny_qwen2_vl, infer={"fp8": "vision"})
    with pytest.raises(ValueError, match=r"infer\.fp8='vision' needs GPUs .* no GPUs"):
        run_infer(spec, models=["base"])
    assert not list(store.list(layout.predictions_dir("base")))
