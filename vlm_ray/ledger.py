"""Exactly-once bookkeeping for sharded stages.

The unit of work and of recovery is one input shard. A worker writes the
shard's output object (deterministic key and content), then creates the
shard's commit marker with a create-only write. A shard is done exactly when
its marker exists, so a re-run skips it, a crashed worker's half-done shard
is redone, and two workers racing on one shard cannot both commit.
"""

from __future__ import annotations

import json
import time
from typing import Any

from vlm_ray.storage import Store


class ShardLedger:
    """Commit markers for one stage's shards under `<prefix>/_done/`."""

    def __init__(self, store: Store, prefix: str):
        self.store = store
        self.prefix = prefix.rstrip("/")

    def _marker(self, shard_id: str) -> str:
        return f"{self.prefix}/_done/{shard_id}.json"

    def is_done(self, shard_id: str) -> bool:
        """True once the shard's output is committed."""
        return self.store.exists(self._marker(shard_id))

    def commit(self, shard_id: str, record: dict[str, Any]) -> bool:
        """Record the shard as done; False if another worker committed it first."""
        body = dict(record, shard_id=shard_id, committed_at=time.time())
        return self.store.create_exclusive(
            self._marker(shard_id), json.dumps(body, sort_keys=True).encode()
        )

    def done_ids(self) -> set[str]:
        """Every committed shard id."""
        base = f"{self.prefix}/_done/"
        return {k[len(base) : -len(".json")] for k in self.store.list(base) if k.endswith(".json")}

    def records(self) -> list[dict[str, Any]]:
        """The commit records of every done shard, in shard-id order."""
        return [self.store.read_json(self._marker(s)) for s in sorted(self.done_ids())]

    def reset(self) -> int:
        """Forget every commit (a forced re-run); returns how many were dropped."""
        return self.store.delete_prefix(f"{self.prefix}/_done")
