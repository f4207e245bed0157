"""Sources: every supported layout, on a folder and on a real S3 server, reads back the same rows,
cut into deterministic input shards; chat-formatted rows are validated."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm_ray.data.chat import BadMessages, to_messages, validate_messages
from vlm_ray.data.image_refs import image_bytes
from vlm_ray.data.sources import (
    detect_format,
    iter_input_shards,
    locate_source,
    read_input_shard,
)
from vlm_ray.storage import LocalStore, S3Store, Store

N = 7


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40 + i, 30), (30 * i % 256, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def expected() -> list[tuple[bytes, str]]:
    return [(png(i), f"caption {i}") for i in range(N)]


def write_jsonl(store: Store) -> str:
    lines = []
    for i, (data, text) in enumerate(expected()):
        store.write_bytes(f"ds/images/{i}.png", data)
        lines.append(json.dumps({"image": f"images/{i}.png", "text": text}))
    store.write_text("ds/data.jsonl", "\n".join(lines) + "\n")
    return "ds/data.jsonl"


def write_parquet(store: Store) -> str:
    # Two files with small row groups: input shards must cross file and row-group boundaries.
    rows = [
        {"image": {"bytes": d, "path": f"{i}.png"}, "text": t}
        for i, (d, t) in enumerate(expected())
    ]
    for name, part in (("a.parquet", rows[:4]), ("b.parquet", rows[4:])):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part), buf, row_group_size=2)
        store.write_bytes(f"ds/{name}", buf.getvalue())
    return "ds"


def write_parquet_plain_columns(store: Store) -> str:
    """Image as raw bytes in one file, as a path relative to the parquet file in the other."""
    pairs = expected()
    for i, (data, _) in enumerate(pairs[4:], start=4):
        store.write_bytes(f"ds/images/{i}.png", data)
    parts = {
        "a.parquet": [{"image": d, "text": t} for d, t in pairs[:4]],
        "b.parquet": [
            {"image": f"images/{i}.png", "text": t} for i, (_, t) in enumerate(pairs) if i >= 4
        ],
    }
    for name, part in parts.items():
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part), buf)
        store.write_bytes(f"ds/{name}", buf.getvalue())
    return "ds"


def write_imagefolder_sidecars(store: Store) -> str:
    for i, (data, text) in enumerate(expected()):
        store.write_bytes(f"ds/img_{i}.png", data)
        store.write_text(f"ds/img_{i}.txt", text + "\n")
    return "ds"


def write_imagefolder_metadata_csv(store: Store) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file_name", "text"])
    for i, (data, text) in enumerate(expected()):
        store.write_bytes(f"ds/pics/{i}.png", data)
        writer.writerow([f"pics/{i}.png", text])
    store.write_text("ds/metadata.csv", buf.getvalue())
    return "ds"


def write_hf_dataset(store: Store, tmp_path: Path) -> str:
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": d, "path": None} for d, _ in expected()],
            "text": [t for _, t in expected()],
        }
    ).cast_column("image", datasets.Image())
    local = tmp_path / "hf"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(local))
    store.upload_dir(local, "ds")
    return "ds"


WRITERS = {
    "jsonl": write_jsonl,
    "parquet": write_parquet,
    "parquet-bytes-and-paths": write_parquet_plain_columns,
    "imagefolder-sidecars": write_imagefolder_sidecars,
    "imagefolder-metadata.csv": write_imagefolder_metadata_csv,
    "hf-save_to_disk": write_hf_dataset,
}
FORMATS = {
    "jsonl": "jsonl",
    "parquet": "parquet",
    "parquet-bytes-and-paths": "parquet",
    "imagefolder-sidecars": "imagefolder",
    "imagefolder-metadata.csv": "imagefolder",
    "hf-save_to_disk": "hf",
}


def _endpoint(store: Store) -> str | None:
    return store.endpoint_url if isinstance(store, S3Store) else None


@pytest.mark.parametrize("layout", list(WRITERS))
def test_every_layout_reads_back_the_same_rows_in_shards(
    layout: str, store: Store, tmp_path: Path
) -> None:
    writer = WRITERS[layout]
    key = writer(store, tmp_path) if layout.startswith("hf") else writer(store)
    uri = store.uri_of(key)
    endpoint = _endpoint(store)
    assert detect_format(uri, endpoint) == FORMATS[layout]
    src = locate_source(uri, "auto", endpoint)
    shards = list(iter_input_shards(src, rows_per_shard=3))
    assert [s.index for s in shards] == [0, 1, 2]
    assert [s.start for s in shards] == [0, 3, 6]
    assert [s.rows for s in shards] == [3, 3, 1]
    got = []
    for shard in shards:
        for raw in read_input_shard(src, shard):
            assert raw.error is None
            cell = raw.record.get("image", raw.record.get("file_name"))
            data, _ = image_bytes(cell, src, raw.base_dir, "image")
            got.append((data, raw.record["text"]))
    assert got == expected()


def test_max_rows_cuts_the_source(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    src = locate_source(store.uri_of(write_parquet(store)), "auto")
    shards = list(iter_input_shards(src, rows_per_shard=3, max_rows=5))
    assert [s.rows for s in shards] == [3, 2]


def test_unknown_folder_and_missing_source_name_the_field(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("nothing here")
    with pytest.raises(ValueError, match=r"data.source .*cannot tell the format.*data.format"):
        detect_format(str(tmp_path))
    with pytest.raises(ValueError, match=r"data.source \./missing: no such file or folder"):
        detect_format("./missing")
    assert detect_format("unsloth/LaTeX_OCR") == "hub"  # a hub id goes to datasets.load_dataset


def test_unparseable_jsonl_line_is_a_row_with_an_error(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"image": "a.png", "text": "ok"}\n{not json\n\n[1, 2]\n')
    src = locate_source(str(tmp_path / "d.jsonl"), "auto")
    (shard,) = iter_input_shards(src, rows_per_shard=10)
    rows = list(read_input_shard(src, shard))
    assert [r.source_id for r in rows] == ["0", "1", "2"]  # the blank line is not a row
    assert rows[0].error is None
    assert rows[1].error.startswith("unparseable JSON line") and rows[1].where["line"] == 2
    assert rows[2].error == "a JSONL row must be an object, got list"


def test_to_messages_is_the_unsloth_format() -> None:
    assert to_messages("Read it.", "x^2", None) == [
        {"role": "user", "content": [{"type": "text", "text": "Read it."}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "x^2"}]},
    ]
    with_system = to_messages("Read it.", None, "You are OCR.")
    assert [m["role"] for m in with_system] == ["system", "user"]


def test_chat_rows_are_validated_and_their_embedded_image_lifted_out() -> None:
    msgs = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Q"}, {"type": "image", "image": "a.png"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
    ]
    row = validate_messages(msgs)
    assert (row.prompt, row.text, row.image) == ("Q", "A", "a.png")
    assert row.messages[0]["content"][1] == {"type": "image"}  # stored messages carry no payload

    bad = {
        "no image": [msgs[0] | {"content": [{"type": "text", "text": "Q"}]}, msgs[1]],
        "no answer": [msgs[0]],
        "unknown part": [msgs[0], {"role": "assistant", "content": [{"type": "audio"}]}],
        "bad role": [{"role": "robot", "content": []}],
    }
    reasons = {}
    for name, messages in bad.items():
        with pytest.raises(BadMessages) as err:
            validate_messages(messages)
        reasons[name] = str(err.value)
    assert reasons["no image"] == "messages must hold exactly one image part, found 0"
    assert "last turn must be the assistant" in reasons["no answer"]
    assert reasons["unknown part"].startswith("messages[1].content[0]: unknown part type 'audio'")
    assert reasons["bad role"].startswith("messages[0]: a turn needs role")
    assert validate_messages([msgs[0]], require_text=False).text is None


def test_hub_datasets_stream_through_load_dataset(tmp_path: Path) -> None:
    # No hub here: a local folder stands in for the repo; the code path is the real
    # `datasets.load_dataset(..., streaming=True)` call a hub id takes.
    store = LocalStore(tmp_path)
    src = locate_source(store.uri_of(write_parquet(store)).removeprefix("file://"), "hub")
    assert src.fmt == "hub"
    shards = list(iter_input_shards(src, rows_per_shard=4))
    assert [s.rows for s in shards] == [4, 3]
    got = []
    for shard in shards:
        for raw in read_input_shard(src, shard):
            data, _ = image_bytes(raw.record["image"], src, raw.base_dir, "image")
            got.append((data, raw.record["text"]))
    assert got == expected()


def test_a_data_file_beside_its_images_folder_is_the_data(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    write_jsonl(store)  # ds/data.jsonl + ds/images/*.png
    assert detect_format(str(tmp_path / "ds")) == "jsonl"
    src = locate_source(str(tmp_path / "ds"), "auto")
    assert src.files == ("data.jsonl",)
