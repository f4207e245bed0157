"""Rejected rows: one JSON object per row with the row's source_id and a reason a person understands."""

from __future__ import annotations

import json
from typing import Any

from vlm_ray.storage import Store


def quarantine_record(source_id: str, reason: str, **extra: Any) -> dict:
    """One quarantine entry; extra fields (image path, line number) help find the row."""
    return {
        "source_id": source_id,
        "reason": reason,
        **{k: v for k, v in extra.items() if v is not None},
    }


def write_quarantine(store: Store, key: str, records: list[dict]) -> None:
    """Write one input shard's rejected rows as JSONL (atomic, so a re-run never duplicates them)."""
    body = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records)
    store.write_text(key, body)


def read_quarantine(store: Store, prefix: str) -> list[dict]:
    """Every quarantine entry under a prefix such as "prepared/quarantine", in shard order."""
    out: list[dict] = []
    for key in sorted(k for k in store.list(prefix.rstrip("/") + "/") if k.endswith(".jsonl")):
        out.extend(json.loads(line) for line in store.read_text(key).splitlines() if line.strip())
    return out
