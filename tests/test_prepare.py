"""The prepare stage on a real local Ray cluster, reading from and writing to a folder and a real S3 server:
bad rows are quarantined with reasons and the job goes on; shards follow the contract; re-runs and
interrupted runs end byte-identical to a clean run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from vlm_ray.config import JobSpec, parse_spec
from vlm_ray.data.quarantine import read_quarantine
from vlm_ray.data.shards import SHARD_SCHEMA, list_shards, read_shard
from vlm_ray.stages.prepare import prepare_dataset, run_prepare
from vlm_ray.storage import LocalStore, S3Store, Store

PROMPT = "Write the LaTeX for this image."


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def good_image(i: int) -> Image.Image:
    img = Image.new("RGB", (120 + 10 * i, 90), (255, 255, 255))
    for x in range(10, 100, 7):
        img.putpixel((x, 40 + i % 5), (0, 0, 0))
    return img


def build_zoo(store: Store, prefix: str = "zoo") -> dict[str, str]:
    """A JSONL dataset with good rows and every bad kind; returns {source_id: expected reason start}."""
    files: dict[str, bytes] = {}
    rows: list[str] = []
    bad: dict[str, str] = {}

    def add(record: dict | str, reason: str | None = None) -> None:
        if reason:
            bad[str(len(rows))] = reason
        rows.append(record if isinstance(record, str) else json.dumps(record))

    for i in range(10):
        files[f"img/ok{i}.png"] = encode(good_image(i))
        add({"image": f"img/ok{i}.png", "text": f"\\frac{{{i}}}{{2}}"})
    files["img/cmyk.jpg"] = encode(Image.new("CMYK", (200, 150), (0, 80, 200, 0)), "JPEG")
    add({"image": "img/cmyk.jpg", "text": "cmyk"})
    frames = [Image.new("RGB", (160, 120), c) for c in ((255, 0, 0), (0, 0, 255))]
    files["img/anim.gif"] = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    add({"image": "img/anim.gif", "text": "gif"})
    add(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Q?"},
                        {"type": "image", "image": "img/ok1.png"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "chat answer"}]},
            ]
        }
    )
    noisy = encode(Image.effect_noise((160, 120), 60).convert("RGB"))
    files["img/trunc.png"] = noisy[: len(noisy) // 2]
    add({"image": "img/trunc.png", "text": "t"}, "truncated PNG")
    files["img/empty.png"] = b""
    add({"image": "img/empty.png", "text": "t"}, "empty file: 0 bytes")
    files["img/fake.jpg"] = b"I am a text file, not a JPEG"
    add({"image": "img/fake.jpg", "text": "t"}, "not an image")
    files["img/dot.png"] = encode(Image.new("RGB", (1, 1)))
    add({"image": "img/dot.png", "text": "t"}, "image too small: 1x1 px")
    files["img/strip.png"] = encode(Image.new("RGB", (3000, 10)))
    add({"image": "img/strip.png", "text": "t"}, "extreme aspect ratio")
    files["img/bomb.png"] = encode(Image.new("L", (1000, 700)))
    add({"image": "img/bomb.png", "text": "t"}, "decompression bomb: 700000 px > limit 500000")
    add({"image": "img/nowhere.png", "text": "t"}, "missing file: 'img/nowhere.png'")
    add({"image": "../../etc/passwd", "text": "t"}, "path escapes the data root")
    add({"image": "img/ok0.png", "text": "   "}, "empty target text in column 'text'")
    add({"image": "img/ok0.png", "text": "x + y = z " * 200}, "target text too long")
    add({"image": "img/ok0.png"}, "row is missing required key 'text'")
    add({"text": "no image"}, "row is missing required key 'image'")
    add('{"image": "img/ok0.png", "text": ', "unparseable JSON line")
    for name, data in files.items():
        store.write_bytes(f"{prefix}/{name}", data)
    store.write_text(f"{prefix}/data.jsonl", "\n".join(rows) + "\n")
    return bad


def make_spec(run_uri: str, source: str, model: Path, endpoint: str | None, **data) -> JobSpec:
    return parse_spec(
        {
            "run": {"uri": run_uri, "s3_endpoint_url": endpoint},
            "model": {"name": str(model), "max_seq_length": 64},
            "data": {
                "source": source,
                "prompt": PROMPT,
                "image_min_size": 56,
                "image_max_size": 112,
                "max_image_pixels": 500_000,
                "rows_per_shard": 8,
                "heldout_fraction": 0.3,
                **data,
            },
        }
    )


def _endpoint(store: Store) -> str | None:
    return store.endpoint_url if isinstance(store, S3Store) else None


def snapshot(store: Store, prefix: str) -> dict[str, bytes]:
    """Every output object under prefix except commit markers (which carry a timestamp)."""
    return {k: store.read_bytes(k) for k in store.list(prefix) if "/_done/" not in k}


def test_bad_rows_are_quarantined_with_reasons_and_good_rows_prepared(
    ray_cluster: None, store: Store, tiny_qwen2_vl: Path
) -> None:
    bad = build_zoo(store)
    spec = make_spec(
        store.uri_of("run"), store.uri_of("zoo/data.jsonl"), tiny_qwen2_vl, _endpoint(store)
    )
    manifest = run_prepare(spec)
    run = store.child("run")

    assert manifest["rows_in"] == 13 + len(bad)
    assert manifest["rows_quarantined"] == len(bad)
    assert manifest["rows_ok"] + manifest["rows_quarantined"] == manifest["rows_in"]
    assert run.read_json("prepared/manifest.json") == manifest
    assert manifest["spec"]["data"]["source"] == spec.data.source
    assert manifest["model_family"] == "qwen2_vl"

    assert sum(manifest["quarantine_reasons"].values()) == len(bad)
    assert manifest["quarantine_reasons"]["decompression bomb"] == 1

    quarantined = read_quarantine(run, "prepared/quarantine")
    by_id = {q["source_id"]: q["reason"] for q in quarantined}
    assert len(quarantined) == len(by_id) == len(bad)
    for source_id, reason_start in bad.items():
        assert by_id[source_id].startswith(reason_start), (source_id, by_id[source_id])

    ids, total = set(), 0
    for split in ("train", "heldout"):
        keys = list_shards(run, f"prepared/{split}")
        assert keys, f"no {split} shards"
        for key in keys:
            table = read_shard(run, key)
            assert table.schema.equals(SHARD_SCHEMA)
            for row in table.to_pylist():
                ids.add(row["id"])
                total += 1
                img = Image.open(io.BytesIO(row["image"]))
                assert img.mode == "RGB" and img.size == (row["width"], row["height"])
                assert row["width"] % 28 == 0 and row["height"] % 28 == 0
                assert 56 <= max(img.size) <= 112
                messages = json.loads(row["messages"])
                assert messages[-1] == {
                    "role": "assistant",
                    "content": [{"type": "text", "text": row["text"]}],
                }
                assert {"type": "image"} in messages[0]["content"]
    assert total == len(ids) == manifest["rows_ok"]  # no row twice, none lost
    assert sum(s["rows"] for s in manifest["shards"]) == total
    assert manifest["splits"]["train"] + manifest["splits"]["heldout"] == total


def test_rerun_skips_committed_shards_and_is_byte_identical(
    ray_cluster: None, store: Store, tiny_qwen2_vl: Path
) -> None:
    build_zoo(store)
    spec = make_spec(
        store.uri_of("run"), store.uri_of("zoo/data.jsonl"), tiny_qwen2_vl, _endpoint(store)
    )
    first = run_prepare(spec)
    before = snapshot(store, "run/prepared")
    markers = {k: store.read_bytes(k) for k in store.list("run/prepared/_done")}
    assert run_prepare(spec) == first
    assert snapshot(store, "run/prepared") == before
    # skipped, not redone: the commit markers (with their timestamps) are untouched
    assert {k: store.read_bytes(k) for k in store.list("run/prepared/_done")} == markers


def test_run_interrupted_between_write_and_commit_resumes_to_the_clean_result(
    ray_cluster: None, tmp_path: Path, tiny_qwen2_vl: Path
) -> None:
    store = LocalStore(tmp_path)
    build_zoo(store)
    source = store.uri_of("zoo/data.jsonl")
    clean = make_spec(store.uri_of("clean"), source, tiny_qwen2_vl, None)
    crashed = make_spec(store.uri_of("crashed"), source, tiny_qwen2_vl, None)
    run_prepare(clean)
    run_prepare(crashed)
    # Leave the states a crash leaves: a shard written but never committed, a shard
    # half-written, a stray temp file of an atomic write, no manifest.
    store.delete("crashed/prepared/_done/shard-00001.json")
    store.delete("crashed/prepared/_done/shard-00002.json")
    store.delete("crashed/prepared/train/shard-00002.parquet")
    store.delete("crashed/prepared/manifest.json")
    (tmp_path / "crashed/prepared/train/.shard-00002.parquet.abc.tmp").write_bytes(b"partial")
    run_prepare(crashed)

    def outputs(run: str) -> dict[str, bytes]:
        return {k.split("/", 1)[1]: v for k, v in snapshot(store, f"{run}/prepared").items()}

    got, want = outputs("crashed"), outputs("clean")
    manifest_got = json.loads(got.pop("prepared/manifest.json"))
    manifest_want = json.loads(want.pop("prepared/manifest.json"))
    assert got == want
    del manifest_got["spec"]["run"], manifest_want["spec"]["run"]  # only the run URI differs
    assert manifest_got == manifest_want


def test_changed_settings_or_source_refuse_to_mix_with_earlier_shards(
    ray_cluster: None, tmp_path: Path, tiny_qwen2_vl: Path
) -> None:
    store = LocalStore(tmp_path)
    build_zoo(store)
    source = store.uri_of("zoo/data.jsonl")
    run_prepare(make_spec(store.uri_of("run"), source, tiny_qwen2_vl, None, max_rows=8))
    with pytest.raises(ValueError, match=r"prepared with different data settings.*new run.uri"):
        run_prepare(make_spec(store.uri_of("run"), source, tiny_qwen2_vl, None, rows_per_shard=5))
    # same settings, but a row of the source edited since: resuming would mix old and new rows
    lines = store.read_text("zoo/data.jsonl").splitlines()
    lines[2] = json.dumps({"image": "img/ok5.png", "text": "edited"})
    store.write_text("zoo/data.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"input shard 0 \(rows 0\.\.\) of .* the source changed"):
        run_prepare(make_spec(store.uri_of("run"), source, tiny_qwen2_vl, None, max_rows=8))


def test_unlabeled_image_folder_for_bulk_captioning(
    ray_cluster: None, tmp_path: Path, tiny_qwen2_vl: Path
) -> None:
    folder = tmp_path / "photos"
    (folder / "day1").mkdir(parents=True)
    for i in range(5):
        good_image(i).save(folder / "day1" / f"{i}.png")
    good_image(0).save(folder / "day1" / "copy_of_0.png")  # same content: dropped by dedup
    (folder / "day1" / "3.txt").write_text("a caption is kept as the reference")
    (folder / "README.md").write_text("not an image, not a row")
    spec = make_spec(str(tmp_path / "run"), "unused", tiny_qwen2_vl, None, dedup=True)
    manifest = prepare_dataset(
        spec, str(folder), "auto", "infer_input", None, require_text=False, prompt="Caption it."
    )
    assert (manifest["rows_in"], manifest["rows_ok"], manifest["rows_quarantined"]) == (6, 5, 1)
    store = LocalStore(tmp_path / "run")
    (q,) = read_quarantine(store, "infer_input/quarantine")
    assert q["source_id"] == "day1/copy_of_0.png" and q["reason"].startswith("duplicate")
    (key,) = list_shards(store, "infer_input/all")
    rows = {r["source_id"]: r for r in read_shard(store, key).to_pylist()}
    assert rows["day1/3.png"]["text"] == "a caption is kept as the reference"
    unlabeled = rows["day1/1.png"]
    assert unlabeled["text"] is None and unlabeled["prompt"] == "Caption it."
    assert json.loads(unlabeled["messages"]) == [
        {"role": "user", "content": [{"type": "text", "text": "Caption it."}, {"type": "image"}]}
    ]


SLOW = {"rows_per_shard": 4, "image_max_size": 1000, "max_image_pixels": 10_000_000}


def write_photos(store: Store, n: int = 16) -> str:
    """Large noisy photos: each 4-row shard takes long enough to be interrupted mid-way."""
    lines = []
    for i in range(n):
        img = Image.effect_noise((1600, 1200), 40 + i).convert("RGB")
        store.write_bytes(f"photos/{i}.jpg", encode(img, "JPEG", quality=90))
        lines.append(json.dumps({"image": f"{i}.jpg", "text": f"photo {i}"}))
    store.write_text("photos/data.jsonl", "\n".join(lines) + "\n")
    return store.uri_of("photos/data.jsonl")


def _running_prepare_workers() -> list:
    """Worker processes of *this* test session's Ray cluster that are running a prepare task now."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith("ray::prepare_shard"):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_worker_killed_mid_shard_is_retried_and_output_equals_a_clean_run(
    ray_cluster: None, tmp_path: Path, tiny_qwen2_vl: Path
) -> None:
    import os
    import signal
    import threading
    import time

    store = LocalStore(tmp_path)
    source = write_photos(store)

    killed: list[int] = []

    def kill_first_busy_worker() -> None:
        deadline = time.time() + 60
        while not killed and time.time() < deadline:
            for proc in _running_prepare_workers():
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_busy_worker, daemon=True)
    killer.start()
    run_prepare(make_spec(store.uri_of("killed"), source, tiny_qwen2_vl, None, **SLOW))
    killer.join(timeout=1)
    assert killed, "no prepare worker was caught running; the test proved nothing"

    run_prepare(make_spec(store.uri_of("clean"), source, tiny_qwen2_vl, None, **SLOW))
    got = {k.split("/", 1)[1]: v for k, v in snapshot(store, "killed/prepared").items()}
    want = {k.split("/", 1)[1]: v for k, v in snapshot(store, "clean/prepared").items()}
    assert got.keys() == want.keys()
    for key in want:
        if not key.endswith("manifest.json"):
            assert got[key] == want[key], key
    manifest = json.loads(got["prepared/manifest.json"])
    assert (manifest["rows_in"], manifest["rows_ok"]) == (16, 16)


def test_driver_killed_mid_run_then_rerun_equals_a_clean_run(
    ray_cluster: None, tmp_path: Path, tiny_qwen2_vl: Path
) -> None:
    import signal
    import subprocess
    import sys
    import time

    import ray

    store = LocalStore(tmp_path)
    source = write_photos(store)
    spec = make_spec(store.uri_of("killed"), source, tiny_qwen2_vl, None, **SLOW)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    # The driver runs in its own process, on this session's cluster, and is SIGKILLed
    # as soon as its first shard is committed (others still running or not started).
    driver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from vlm_ray.config import JobSpec; from vlm_ray.stages.prepare import run_prepare;"
            "spec = JobSpec.model_validate_json(open(sys.argv[1]).read());"
            "spec.ray.address = sys.argv[2]; run_prepare(spec)",
            str(spec_file),
            ray.get_runtime_context().gcs_address,
        ]
    )
    deadline = time.time() + 120
    while driver.poll() is None and time.time() < deadline:
        if any(store.list("killed/prepared/_done")):
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    driver.wait(timeout=30)
    committed = len(list(store.list("killed/prepared/_done")))
    assert driver.returncode == -signal.SIGKILL and 0 < committed < 4, (
        driver.returncode,
        committed,
    )
    assert not store.exists("killed/prepared/manifest.json")

    resumed = run_prepare(spec)
    clean = run_prepare(make_spec(store.uri_of("clean"), source, tiny_qwen2_vl, None, **SLOW))
    got = {k.split("/", 1)[1]: v for k, v in snapshot(store, "killed/prepared").items()}
    want = {k.split("/", 1)[1]: v for k, v in snapshot(store, "clean/prepared").items()}
    got.pop("prepared/manifest.json"), want.pop("prepared/manifest.json")
    assert got == want
    assert resumed["shards"] == clean["shards"] and resumed["rows_ok"] == 16
