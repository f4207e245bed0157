"""Prepared shard I/O: the parquet schema of docs/architecture.md, atomic writes, listing."""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.parquet as pq

from vlm_ray.storage import Store

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("system_prompt", pa.string()),
        pa.field("text", pa.string()),
        pa.field("messages", pa.string(), nullable=False),
    ]
)

# Row groups of a few dozen images keep readers' memory small (images dominate).
ROW_GROUP_ROWS = 64


def write_shard(store: Store, key: str, rows: list[dict]) -> dict:
    """Write rows as one parquet object (atomic); returns {"key", "rows", "sha256"}."""
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS, compression="zstd")
    data = buf.getvalue()
    store.write_bytes(key, data)
    return {"key": key, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}


def read_shard(store: Store, key: str) -> pa.Table:
    """One prepared shard as a pyarrow Table."""
    return pq.read_table(io.BytesIO(store.read_bytes(key)))


def list_shards(store: Store, prefix: str) -> list[str]:
    """Sorted keys of shard-*.parquet directly under a prefix such as "prepared/heldout"."""
    base = prefix.rstrip("/") + "/"
    return sorted(
        k
        for k in store.list(base)
        if k.endswith(".parquet")
        and "/" not in k[len(base) :]
        and k[len(base) :].startswith("shard-")
    )
