"""Error records for the input rows prepare rejected, so predictions account for every input row.

With infer.source, prepare_dataset writes an input shard's rejected rows to
bulk/<job>/input/quarantine/shard-NNNNN.jsonl (vlm_ray.data.quarantine), keyed by the same
input-shard number as its parquet shard bulk/<job>/input/all/shard-NNNNN.parquet. Those rows go
into the predictions file of the same shard, with prediction null and the reason as the error.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vlm_ray.config import JobSpec
from vlm_ray.storage import Store


def quarantined_row_id(entry: dict[str, Any]) -> str:
    """The entry's id where prepare knew it, else a stable hash of its source_id."""
    if entry.get("id"):
        return str(entry["id"])
    # Prefixed, so it can never equal a prepared row's id (a hash of "<source name>:<source_id>").
    return hashlib.sha256(f"quarantined:{entry['source_id']}".encode()).hexdigest()[:20]


def fixed_prompt(spec: JobSpec) -> str | None:
    """The prompt every infer.source row gets (None when it comes from a per-row prompt column)."""
    if spec.infer.prompt:
        return spec.infer.prompt
    # infer.source is read with its own columns (stages.infer.infer_source_spec): the
    # training data's prompt_column says nothing about it.
    return None if spec.infer.prompt_column else spec.data.prompt


def quarantined_records(store: Store, key: str, prompt: str | None) -> list[dict[str, Any]]:
    """One error record (the predictions schema, docs/architecture.md) per line of a quarantine file."""
    records = []
    for line in store.read_text(key).splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        records.append(
            {
                "id": quarantined_row_id(entry),
                "source_id": entry["source_id"],
                "prompt": prompt,
                "prediction": None,
                "reference": None,
                "tokens": 0,
                "latency_s": 0.0,
                "error": entry["reason"],
            }
        )
    return records
