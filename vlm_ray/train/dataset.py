"""A map-style torch Dataset over the prepared parquet shards in object storage.

Rows are addressed by a global index (shard order, then row order), so the
Trainer's seeded sampler gives the same order on every attempt and
`resume_from_checkpoint` can skip exactly the batches already consumed.

Memory stays bounded whatever the data size: a shard is fetched from the store
the first time one of its rows is read and kept on local disk as an
uncompressed Arrow file that is memory-mapped (the page cache holds it, not
the heap); at most `max_open_shards` are open at once. Images stay encoded in
the shard and are decoded in `__getitem__`, i.e. in the data loader.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import Dataset

from vlm_ray import layout
from vlm_ray.data.shards import list_shards
from vlm_ray.operator_errors import MissingInputError
from vlm_ray.storage import Store
from vlm_ray.train.length_grouping import lengths_of_tables

log = logging.getLogger(__name__)

COLUMNS = ["id", "image", "messages", "width", "height"]
# in the local cache file's name: a cache written with other columns is never read
_CACHE_FORMAT = "c2"


def list_prepared_shards(store: Store, split: str) -> list[tuple[str, int | None, str | None]]:
    """(key, rows, sha256) of every prepared shard of a split, in shard order; rows and sha256 from the manifest."""
    known: dict[str, dict[str, Any]] = {}
    if store.exists(layout.PREPARED_MANIFEST):
        for entry in store.read_json(layout.PREPARED_MANIFEST).get("shards", []):
            if entry.get("split") == split:
                known[entry["key"]] = entry
    keys = list_shards(store, f"{layout.PREPARED}/{split}")
    if not keys:
        raise MissingInputError(
            f"no prepared {split} shards under {store.uri_of(f'{layout.PREPARED}/{split}')}: "
            "run the prepare stage first (vlm-ray prepare --config <spec>)"
        )
    return [(k, known.get(k, {}).get("rows"), known.get(k, {}).get("sha256")) for k in keys]


class PreparedShardsDataset(Dataset):
    """Rows {"id", "messages", "images": [PIL.Image]} of one prepared split, loaded shard by shard on demand."""

    def __init__(
        self, store: Store, split: str, cache_dir: str | os.PathLike[str], max_open_shards: int = 4
    ):
        self.store = store
        self.split = split
        self.cache_dir = Path(cache_dir)
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, pa.Table] = OrderedDict()
        shards = list_prepared_shards(store, split)
        self.keys = [k for k, _, _ in shards]
        self.digests = [sha for _, _, sha in shards]
        # Without a manifest entry the shard is fetched now to count its rows.
        counts = [
            n if n is not None else self._load(i).num_rows for i, (_, n, _) in enumerate(shards)
        ]
        self.starts = [0]
        for n in counts:
            self.starts.append(self.starts[-1] + n)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict[str, Any]:
        # Data loader workers get the index, not the open memory maps.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _local_file(self, index: int) -> Path:
        """The shard as a local uncompressed Arrow file (fetched from the store once per node)."""
        # Named by content hash where the manifest gives one: a re-prepared run never reads a stale copy.
        digest = self.digests[index]
        name = Path(self.keys[index]).stem + (f"-{digest[:16]}" if digest else "")
        path = self.cache_dir / f"{name}.{_CACHE_FORMAT}.arrow"
        if path.exists():
            return path
        table = pq.read_table(io.BytesIO(self.store.read_bytes(self.keys[index])), columns=COLUMNS)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: two loader workers may fetch the same shard at once.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f, ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
        return path

    def _load(self, index: int) -> pa.Table:
        """The shard's rows, memory-mapped from the local Arrow file."""
        return ipc.open_file(pa.memory_map(str(self._local_file(index)), "r")).read_all()

    def _table(self, index: int) -> pa.Table:
        """The shard's rows through the small LRU of open shards."""
        table = self._open.get(index)
        if table is not None:
            self._open.move_to_end(index)
            return table
        table = self._load(index)
        expected = self.starts[index + 1] - self.starts[index]
        if table.num_rows != expected:
            raise ValueError(
                f"{self.store.uri_of(self.keys[index])} has {table.num_rows} rows but "
                f"{layout.PREPARED_MANIFEST} says {expected}: re-run the prepare stage"
            )
        self._open[index] = table
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return table

    def lengths(self) -> list[int]:
        """Every row's length_proxy, in index order (fetches every shard once)."""
        return lengths_of_tables([self._load(i) for i in range(len(self.keys))])

    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, row in shard) of global row i."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range: the {self.split} split has {len(self)} rows")
        shard = bisect.bisect_right(self.starts, i) - 1
        return shard, i - self.starts[shard]

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, row = self.locate(i)
        table = self._table(shard)
        row_id = table.column("id")[row].as_py()
        try:
            image = Image.open(io.BytesIO(table.column("image")[row].as_py())).convert("RGB")
            messages = json.loads(table.column("messages")[row].as_py())
        except Exception as err:
            raise ValueError(
                f"{self.store.uri_of(self.keys[shard])} row {row} (id {row_id}): cannot be read "
                f"({err}); re-run the prepare stage"
            ) from err
        return {"id": row_id, "messages": messages, "images": [image]}
