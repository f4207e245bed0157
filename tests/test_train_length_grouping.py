"""train.group_by_length: each step's rows have similar lengths, every row is still seen exactly
once per epoch, and the order depends on (seed, epoch) only, so a resumed run sees the same one
(tests/test_train_resume.py resumes with it on)."""

from __future__ import annotations

import random
from pathlib import Path

from vlm_ray.storage import LocalStore
from vlm_ray.train.dataset import PreparedShardsDataset
from vlm_ray.train.length_grouping import (
    SeededLengthGroupedSampler,
    length_proxy,
    lengths_of_parquet,
    with_length_grouping,
)
from vlm_ray.train.unsloth_engine import local_train_shards


def _padding(order: list[int], lengths: list[int], batch: int) -> int:
    """Pad tokens when consecutive rows of `order` form batches padded to their longest row."""
    waste = 0
    for i in range(0, len(order), batch):
        rows = [lengths[j] for j in order[i : i + batch]]
        waste += max(rows) * len(rows) - sum(rows)
    return waste


def test_every_row_once_per_epoch_in_an_order_fixed_by_seed_and_epoch():
    lengths = [random.Random(i).randint(10, 2000) for i in range(500)]
    sampler = SeededLengthGroupedSampler(lengths, group_size=8, seed=3407)
    first = list(sampler)
    assert sorted(first) == list(range(500)) and len(sampler) == 500
    assert list(SeededLengthGroupedSampler(lengths, 8, 3407)) == first, "same seed, same order"
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(500)) and second != first, "a new shuffle per epoch"
    sampler.set_epoch(0)
    assert list(sampler) == first, "a resumed epoch is the same epoch"


def test_grouped_batches_carry_far_less_padding_than_random_ones():
    # OCR-like data: small crops and full pages mixed
    rng = random.Random(0)
    lengths = [rng.choice([80, 300, 1500]) + rng.randint(0, 40) for _ in range(2000)]
    grouped = list(SeededLengthGroupedSampler(lengths, group_size=8, seed=1))
    shuffled = list(range(2000))
    random.Random(1).shuffle(shuffled)
    assert _padding(grouped, lengths, 8) < 0.1 * _padding(shuffled, lengths, 8)


def test_a_rows_length_grows_with_its_image_and_its_text():
    assert length_proxy(448, 448, "x" * 40) == 256 + 10
    assert length_proxy(896, 448, "x" * 40) > length_proxy(448, 448, "x" * 40)
    assert length_proxy(448, 448, "x" * 400) > length_proxy(448, 448, "x" * 40)


def test_both_engines_see_the_same_lengths_in_the_same_order(write_prepared, tmp_path: Path):
    store = LocalStore(tmp_path / "run")
    write_prepared(store, rows=6, rows_per_shard=4)  # two shards: order across shards counts
    ours = PreparedShardsDataset(store, "train", tmp_path / "cache").lengths()
    assert ours == lengths_of_parquet(local_train_shards(store, tmp_path / "work"))
    assert len(ours) == 6 and len(set(ours)) > 1  # 56x56 and 84x56 images


def test_the_trainer_batches_rows_of_one_length_together(
    tiny_qwen2_vl, write_prepared, tmp_path: Path
):
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        Trainer,
        TrainingArguments,
    )

    from vlm_ray.models.families import family_of
    from vlm_ray.train.collator import VisionSFTCollator

    store = LocalStore(tmp_path / "run")
    write_prepared(store, rows=32)  # 56x56 and 84x56 images, alternating
    dataset = PreparedShardsDataset(store, "train", tmp_path / "cache")
    lengths = dataset.lengths()
    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    trainer_cls = with_length_grouping(Trainer, lengths, seed=7)
    trainer = trainer_cls(
        model=AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl),
        args=TrainingArguments(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=2,
            use_cpu=True,
            report_to=[],
        ),
        train_dataset=dataset,
        data_collator=VisionSFTCollator(processor, family_of(tiny_qwen2_vl), True, 256),
    )
    batches = list(trainer.get_train_dataloader().batch_sampler)
    assert sorted(i for b in batches for i in b) == list(range(32))
    # transformers sorts mega-batches of 8 rows here (a quarter of the data): each holds at most
    # one boundary between the two lengths, plus one from moving the longest row to the front
    # (in row order every one of the 16 batches would mix the two sizes)
    mixed = [b for b in batches if len({lengths[i] for i in b}) > 1]
    assert len(mixed) <= 32 // 8 + 1, batches
