"""Streaming readers for the files a source is made of: text lines, parquet row ranges, HF datasets.

Local files are read in place; s3:// objects are streamed (text), range-read
(parquet, through pyarrow's S3 filesystem) or copied once per node (datasets
saved with save_to_disk, which `load_from_disk` needs as files).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm_ray.storage import LocalStore, S3Store, Store, is_s3, open_store


def iter_lines(store: Store, key: str) -> Iterator[str]:
    """Lines of a text object, streamed (a local file handle, or an S3 body read in chunks)."""
    if isinstance(store, LocalStore):
        with open(store.local_path(key), encoding="utf-8", errors="replace", newline="") as f:
            for line in f:
                yield line.rstrip("\r\n")
    elif isinstance(store, S3Store):
        body = store.client.get_object(Bucket=store.loc.bucket, Key=store._key(key))["Body"]
        for line in body.iter_lines(chunk_size=1 << 20):
            yield line.decode("utf-8", errors="replace").rstrip("\r")
    else:  # pragma: no cover - only two backends exist
        yield from store.read_text(key).splitlines()


def open_parquet(store: Store, key: str) -> Any:
    """A pyarrow ParquetFile over a local file or an S3 object (range reads, not a full download)."""
    import pyarrow.parquet as pq

    if isinstance(store, LocalStore):
        return pq.ParquetFile(store.local_path(key))
    if isinstance(store, S3Store):
        return pq.ParquetFile(
            _s3_filesystem(store.endpoint_url).open_input_file(
                f"{store.loc.bucket}/{store._key(key)}"
            )
        )
    return pq.ParquetFile(io.BytesIO(store.read_bytes(key)))  # pragma: no cover


def _s3_filesystem(endpoint_url: str | None) -> Any:
    from pyarrow import fs

    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint_url:
        scheme, _, host = endpoint_url.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    return fs.S3FileSystem(**kwargs)


def read_parquet_rows(store: Store, key: str, start: int, stop: int) -> Iterator[dict]:
    """Rows [start, stop) of one parquet file, reading only the row groups that hold them."""
    pf = open_parquet(store, key)
    first = 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        lo, hi = max(start, first), min(stop, first + n)
        if lo < hi:
            table = pf.read_row_group(rg).slice(lo - first, hi - lo)
            yield from table.to_pylist()
        first += n
        if first >= stop:
            break


def iter_hub(given: str, split: str | None) -> Iterator[dict]:
    """A hub dataset through datasets.load_dataset (streaming, images left undecoded)."""
    import datasets

    ds = datasets.load_dataset(given, split=split or "train", streaming=True)
    ds = _undecoded_images(ds)
    yield from ds


def load_hf_disk(given: str, split: str | None, endpoint_url: str | None) -> Any:
    """A dataset saved with save_to_disk (a DatasetDict's data.split, default train), images undecoded."""
    import datasets

    path = given.removeprefix("file://")
    if is_s3(given):
        path = str(local_copy(given, endpoint_url))
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise ValueError(
                f"data.split {split!r} is not in {given}; it has {', '.join(ds)} (set data.split)"
            )
        ds = ds[split]
    return _undecoded_images(ds)


def _undecoded_images(ds: Any) -> Any:
    """Image features as {bytes, path} rather than PIL objects: our pipeline decodes them itself."""
    import datasets

    features = ds.features or {}
    for name, feat in features.items():
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def local_copy(uri: str, endpoint_url: str | None) -> Path:
    """A node-local copy of an object-storage folder (made once per node), for libraries that need files."""
    cache = Path(os.environ.get("VLM_RAY_CACHE", Path.home() / ".cache" / "vlm-ray")) / "data"
    dest = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (dest / ".complete").exists():
        tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
        open_store(uri, endpoint_url).download_dir("", tmp)
        (tmp / ".complete").touch()
        try:
            tmp.rename(dest)
        except OSError:  # another process on this node finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return dest
