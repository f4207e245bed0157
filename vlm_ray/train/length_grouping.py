"""Length-grouped batches for training (spec train.group_by_length).

A batch is padded to its longest row, and a vision-language row's length is mostly its image:
a 448 x 448 image is 256 tokens in Qwen2-VL, a 1344 x 896 one 1,536. With images of mixed sizes
in random batches, much of each step is padding. Grouping rows of similar length into batches
(transformers' get_length_grouped_indices: shuffle, cut into mega-batches of 50 batches, sort
each by length) keeps the randomness between batches and removes most of the padding.

The order must be the same on every attempt, so that a resumed run skips exactly the batches
it already trained on: the sampler draws from its own generator, seeded by train.seed and the
epoch, never from the global RNG (which a resume restores to a later state).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

# Qwen2-VL's merged patch: 28 x 28 px per image token. For families with a fixed image size the
# image term is constant and the text decides; a proxy only needs the order right.
PIXELS_PER_TOKEN = 28 * 28
CHARS_PER_TOKEN = 4


def length_proxy(width: int, height: int, messages_json: str) -> int:
    """A row's approximate token count: image pixels / 784 + JSON characters / 4."""
    return width * height // PIXELS_PER_TOKEN + len(messages_json) // CHARS_PER_TOKEN


# the prepared-shard columns length_proxy reads
LENGTH_COLUMNS = ["width", "height", "messages"]


def lengths_of_tables(tables: Sequence[Any]) -> list[int]:
    """length_proxy of every row of these Arrow tables (prepared shards), in order."""
    out: list[int] = []
    for table in tables:
        widths = table.column("width").to_pylist()
        heights = table.column("height").to_pylist()
        messages = table.column("messages").to_pylist()
        out += [length_proxy(w, h, m) for w, h, m in zip(widths, heights, messages, strict=True)]
    return out


def lengths_of_parquet(paths: Sequence[str]) -> list[int]:
    """length_proxy of every row of these local prepared-shard parquet files, in order."""
    import pyarrow.parquet as pq

    return lengths_of_tables([pq.read_table(p, columns=LENGTH_COLUMNS) for p in paths])


class SeededLengthGroupedSampler(Sampler[int]):
    """Indices in length-grouped order, a new shuffle per epoch from (seed, epoch) only."""

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int):
        self.lengths = list(lengths)
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate) before each epoch and on resume."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))


def with_length_grouping(trainer_cls: type, lengths: Sequence[int], seed: int) -> type:
    """A subclass of `trainer_cls` (Trainer or TRL's SFTTrainer) that samples length-grouped."""

    class LengthGroupedTrainer(trainer_cls):
        def _get_train_sampler(self, train_dataset: Any = None) -> Sampler[int]:
            # one group per optimiser step: the rows of an accumulated step share a length too
            group = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return SeededLengthGroupedSampler(lengths, group, seed)

    LengthGroupedTrainer.__name__ = f"LengthGrouped{trainer_cls.__name__}"
    return LengthGroupedTrainer
