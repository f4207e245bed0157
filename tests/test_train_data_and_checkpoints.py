"""The train dataset reads prepared shards from object storage on demand; checkpoints in object storage
count only when complete, are pruned to save_total_limit, and the newest is what a restart resumes from."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from vlm_ray.train.checkpoints import (
    checkpoint_prefix,
    completed_checkpoint_steps,
    download_latest_checkpoint,
    upload_checkpoint,
)
from vlm_ray.train.dataset import PreparedShardsDataset


def test_dataset_reads_every_row_of_every_shard_in_order_with_decoded_images(
    store, write_prepared, tmp_path: Path
):
    recs = write_prepared(store, rows=7, rows_per_shard=3)  # shards of 3, 3, 1 rows
    ds = PreparedShardsDataset(store, "train", tmp_path / "cache", max_open_shards=1)
    assert len(ds) == 7
    rows = [ds[i] for i in range(len(ds))]
    assert [r["id"] for r in rows] == [r["id"] for r in recs[:7]]
    for row, rec in zip(rows, recs, strict=False):
        (image,) = row["images"]
        assert image.mode == "RGB" and image.size == (rec["width"], rec["height"])
        assert row["messages"][1]["content"][0]["text"] == rec["text"]
    assert len(ds._open) == 1  # at most max_open_shards shards open at once
    # data loader workers receive the index, not the open shards
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone._open) == 0 and clone[4]["id"] == rows[4]["id"]


def test_dataset_without_prepared_shards_says_to_run_prepare(store, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="run the prepare stage"):
        PreparedShardsDataset(store, "train", tmp_path / "cache")


def _fake_checkpoint(root: Path, step: int) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (folder / "optimizer.pt").write_bytes(b"x" * 100)
    return folder


def test_only_the_newest_complete_checkpoints_are_kept_and_resumed_from(store, tmp_path: Path):
    for step in (2, 4, 6):
        upload_checkpoint(store, _fake_checkpoint(tmp_path / "out", step), step, keep=2)
    assert completed_checkpoint_steps(store) == [4, 6]
    assert not list(store.list(checkpoint_prefix(2)))

    # an upload cut short (no _complete.json) is never resumed from...
    store.write_bytes(f"{checkpoint_prefix(8)}/trainer_state.json", b"{}")
    local = download_latest_checkpoint(store, tmp_path / "resume")
    assert local is not None and Path(local).name == "checkpoint-6"
    assert (Path(local) / "trainer_state.json").read_text() == '{"global_step": 6}'
    # ...and is cleaned up once a newer checkpoint is complete
    upload_checkpoint(store, _fake_checkpoint(tmp_path / "out", 10), 10, keep=2)
    assert completed_checkpoint_steps(store) == [6, 10]
    assert not list(store.list(checkpoint_prefix(8)))


def test_no_checkpoint_means_a_fresh_start(store, tmp_path: Path):
    assert download_latest_checkpoint(store, tmp_path / "resume") is None
