"""Reading what a user has, as deterministic input shards: HF datasets, parquet, JSONL, image folders.

The driver only *plans*: it streams the source (JSONL lines, a folder listing,
parquet footers, a dataset's row count) and cuts it into input shards of rows
[i*N, (i+1)*N) in source order. Workers *read*: each input shard is either a
small inline list of records (JSONL lines, file names) or a pointer to a row
range of a parquet file / saved dataset, so large image bytes never pass
through the driver. Local paths and s3:// work the same way.
"""

from __future__ import annotations

import csv
import hashlib
import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlm_ray.data.readers import iter_hub, iter_lines, load_hf_disk, open_parquet, read_parquet_rows
from vlm_ray.storage import LocalStore, Store, is_s3, open_store, split_uri

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".webp",
    ".bmp",
    ".tif",
    ".tiff",
    ".jfif",
    ".ppm",
    ".pgm",
)
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Source:
    """A located data source: its format, the folder it lives in, and the files that hold its rows."""

    given: str  # data.source as written in the spec
    fmt: str  # hf | hub | parquet | jsonl | csv | imagefolder
    root: str  # URI of the folder image paths resolve in
    files: tuple[str, ...] = ()  # keys under root (jsonl / csv / parquet), in order
    split: str | None = None
    endpoint_url: str | None = None

    @property
    def name(self) -> str:
        """The source's last path component: row ids hash it, so a copy elsewhere keeps its ids."""
        return self.given.rstrip("/").rsplit("/", 1)[-1]

    def store(self) -> Store:
        return open_store(self.root, self.endpoint_url)


@dataclass
class InputShard:
    """Rows [start, start + len) of a source: inline records, or (file key, start, stop) ranges to read."""

    index: int
    start: int
    records: list[dict] = field(default_factory=list)
    ranges: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.records) + sum(b - a for _, a, b in self.ranges)

    def digest(self) -> str:
        """A hash of what this shard reads: a resumed run checks its committed shards still match the source."""
        body = json.dumps([self.start, self.records, self.ranges], sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass
class RawRow:
    """One source row as read: its source_id, the record (None when unparseable) and why not."""

    source_id: str
    record: dict | None
    base_dir: str = ""  # key prefix relative image paths resolve against
    error: str | None = None
    where: dict = field(default_factory=dict)  # file / line, for the quarantine entry


# --------------------------------------------------------------------------- locate


def locate_source(
    source: str, fmt: str, endpoint_url: str | None = None, split: str | None = None
) -> Source:
    """Find the format (when "auto") and the files of a source; raises ValueError naming data.source."""
    if fmt == "auto":
        fmt = detect_format(source, endpoint_url)
    if fmt != "hub" and not is_s3(source) and Path(_local(source)).exists():
        # workers may run in another folder: hand them an absolute path
        source = str(Path(_local(source)).resolve())
    if fmt == "hub":
        return Source(source, "hub", ".", split=split, endpoint_url=endpoint_url)
    if fmt == "hf":
        if not is_s3(source) and not Path(_local(source)).exists():
            return Source(source, "hub", ".", split=split, endpoint_url=endpoint_url)
        return Source(source, "hf", source, split=split, endpoint_url=endpoint_url)
    store, key = _root_and_key(source, endpoint_url)
    root = store.uri
    if fmt == "imagefolder":
        folder = open_store(source, endpoint_url)
        for meta in METADATA_FILES:
            if folder.exists(meta):
                kind = "jsonl" if meta.endswith(".jsonl") else "csv"
                return Source(source, kind, folder.uri, (meta,), split, endpoint_url)
        return Source(source, "imagefolder", folder.uri, (), split, endpoint_url)
    # a named file may be .json; in a folder only .jsonl counts (not every config file)
    suffix = {"jsonl": (".jsonl",), "parquet": (".parquet",)}[fmt]
    if key:  # a single file
        return Source(source, fmt, root, (key,), split, endpoint_url)
    files = tuple(k for k in store.list("") if k.lower().endswith(suffix))
    if not files:
        raise ValueError(
            f"data.source {source}: no {'/'.join(suffix)} files in this folder (data.format is {fmt})"
        )
    return Source(source, fmt, root, files, split, endpoint_url)


def detect_format(source: str, endpoint_url: str | None = None) -> str:
    """hf | hub | parquet | jsonl | imagefolder, from the source's name and contents."""
    lower = source.lower().rstrip("/")
    if lower.endswith((".jsonl", ".json")):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if not is_s3(source) and not Path(_local(source)).exists():
        if _HUB_ID.match(source) and not source.startswith((".", "/")):
            return "hub"
        raise ValueError(f"data.source {source}: no such file or folder")
    folder = open_store(source, endpoint_url)
    if any(folder.exists(m) for m in HF_MARKERS):
        return "hf"
    if any(folder.exists(m) for m in METADATA_FILES):
        return "imagefolder"
    seen = {"parquet": 0, "jsonl": 0, "image": 0}
    for i, key in enumerate(folder.list("")):
        k = key.lower()
        if k.endswith(".parquet"):
            seen["parquet"] += 1
        elif k.endswith(".jsonl"):
            seen["jsonl"] += 1
        elif k.endswith(IMAGE_EXTENSIONS):
            seen["image"] += 1
        if i >= 2000:  # enough to tell; never list a million-file folder here
            break
    # Data files win over images: a JSONL or parquet file beside its images folder is the data.
    if seen["parquet"]:
        return "parquet"
    if seen["jsonl"]:
        return "jsonl"
    if seen["image"]:
        return "imagefolder"
    raise ValueError(
        f"data.source {source}: cannot tell the format (no dataset_info.json, parquet, JSONL or images "
        "found); set data.format to hf, parquet, jsonl or imagefolder"
    )


def _local(source: str) -> str:
    return source[len("file://") :] if source.startswith("file://") else source


def _root_and_key(source: str, endpoint_url: str | None) -> tuple[Store, str]:
    """(store of the folder, key of the file) for a file; (store of the folder, "") for a folder."""
    if is_s3(source):
        parent, name = split_uri(source, endpoint_url)
        if name and parent.exists(name):
            return parent, name
        return open_store(source, endpoint_url), ""
    path = Path(_local(source))
    if path.is_dir():
        return LocalStore(path), ""
    if not path.exists():
        raise ValueError(f"data.source {source}: no such file or folder")
    return LocalStore(path.parent), path.name


# --------------------------------------------------------------------------- plan (driver)


def iter_input_shards(
    src: Source, rows_per_shard: int, max_rows: int | None = None
) -> Iterator[InputShard]:
    """Cut the source into input shards of rows [i*N, (i+1)*N), streaming; never holds more than one shard."""
    if src.fmt in ("parquet", "hf"):
        yield from _range_shards(_file_row_counts(src), rows_per_shard, max_rows)
        return
    shard = InputShard(0, 0)
    for n, record in enumerate(_iter_records(src), start=1):
        if max_rows is not None and n > max_rows:
            break
        shard.records.append(record)
        if len(shard.records) == rows_per_shard:
            yield shard
            shard = InputShard(shard.index + 1, n)
    if shard.records:
        yield shard


def _range_shards(
    counts: list[tuple[str, int]], rows_per_shard: int, max_rows: int | None
) -> Iterator[InputShard]:
    total = sum(c for _, c in counts)
    if max_rows is not None:
        total = min(total, max_rows)
    offsets, pos = [], 0
    for key, count in counts:
        offsets.append((key, pos, pos + count))
        pos += count
    for index, start in enumerate(range(0, total, rows_per_shard)):
        stop = min(start + rows_per_shard, total)
        ranges = [
            (key, max(start, a) - a, min(stop, b) - a)
            for key, a, b in offsets
            if a < stop and b > start
        ]
        yield InputShard(index, start, ranges=ranges)


def _file_row_counts(src: Source) -> list[tuple[str, int]]:
    """Rows per parquet file (footers only) or of the saved dataset."""
    if src.fmt == "hf":
        return [("", len(load_hf_disk(src.given, src.split, src.endpoint_url)))]
    store = src.store()
    return [(key, open_parquet(store, key).metadata.num_rows) for key in src.files]


def _iter_records(src: Source) -> Iterator[dict]:
    """Small per-row records the driver may hold: a JSONL line, a CSV row, an image's key, a hub row."""
    store = src.store()
    if src.fmt == "jsonl":
        for key in src.files:
            for line_no, line in enumerate(iter_lines(store, key), start=1):
                if line.strip():
                    yield {"file": key, "line": line_no, "raw": line}
    elif src.fmt == "csv":
        for key in src.files:
            reader = csv.DictReader(iter_lines(store, key))
            for record in reader:
                yield {"file": key, "line": reader.line_num, "row": record}
    elif src.fmt == "imagefolder":
        for key in store.list(""):
            name = key.rsplit("/", 1)[-1]
            if key.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                yield {"image_key": key}
    elif src.fmt == "hub":
        for record in iter_hub(src.given, src.split):
            yield {"row": record}
    else:  # pragma: no cover - locate_source only makes the formats above
        raise ValueError(f"unknown source format {src.fmt}")


# --------------------------------------------------------------------------- read (workers)


def read_input_shard(src: Source, shard: InputShard) -> Iterator[RawRow]:
    """The raw rows of one input shard, in order; unparseable rows come back with `error` set."""
    if src.fmt == "parquet":
        store = src.store()
        index = shard.start
        for key, a, b in shard.ranges:
            base = posixpath.dirname(key)
            for record in read_parquet_rows(store, key, a, b):
                yield RawRow(str(index), record, base)
                index += 1
    elif src.fmt == "hf":
        ds = load_hf_disk(src.given, src.split, src.endpoint_url)
        for _, a, b in shard.ranges:
            for offset, record in enumerate(ds.select(range(a, b))):
                yield RawRow(str(a + offset), record)
    else:
        for offset, rec in enumerate(shard.records):
            yield _raw_from_record(src, shard.start + offset, rec)


def _raw_from_record(src: Source, index: int, rec: dict) -> RawRow:
    if "raw" in rec:
        where = {"file": rec["file"], "line": rec["line"]}
        base = posixpath.dirname(rec["file"])
        try:
            record = json.loads(rec["raw"])
        except json.JSONDecodeError as err:
            return RawRow(str(index), None, base, f"unparseable JSON line: {err.msg}", where)
        if not isinstance(record, dict):
            return RawRow(
                str(index),
                None,
                base,
                f"a JSONL row must be an object, got {type(record).__name__}",
                where,
            )
        return RawRow(str(index), record, base, where=where)
    if "row" in rec and "file" in rec:  # metadata.csv
        return RawRow(
            str(index),
            rec["row"],
            posixpath.dirname(rec["file"]),
            where={"file": rec["file"], "line": rec["line"]},
        )
    if "image_key" in rec:  # image folder: the caption sits beside the image
        key = rec["image_key"]
        caption = _read_sidecar(src.store(), key)
        record = {"image": posixpath.basename(key), "text": caption}
        return RawRow(key, record, posixpath.dirname(key))
    return RawRow(str(index), rec["row"])


def _read_sidecar(store: Store, image_key: str) -> str | None:
    stem = image_key.rsplit(".", 1)[0]
    try:
        return store.read_text(stem + ".txt").strip()
    except FileNotFoundError:
        return None
