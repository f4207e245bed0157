"""Qwen2-VL's 3D rotary position ids for a whole batch at once, instead of row by row.

transformers (5.17) builds them in `Qwen2VLModel.get_rope_index` with a Python loop over the
batch: per row a boolean index, a `.tolist()`, a `groupby`, and per image `.item()` calls and a
handful of small tensors. On a GPU every row costs several device synchronisations and a few
dozen kernel launches, while the GPU waits: `generate` calls it before the vision tower is
queued, so at batch 512 it is a stretch of pure idle time per batch; in training, a few ms
per step.

The same ids come from a few whole-batch tensor operations. Per row, its unmasked tokens are
taken in order; a text token moves the position on by one; an image's block of tokens sits at
the position where it starts, plus its (t, h, w) index within the merged grid, and moves the
position on by max(h, w) once it ends. So the position where each token's segment starts is an
exclusive cumulative sum of those moves, and an image token's index within its block is its
distance from the block's first token. Images only: with videos (or anything else the loop
reads) the original runs.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch

from vlm_ray.models.submodules import unwrapped

log = logging.getLogger(__name__)

# transformers' models whose get_rope_index this reproduces for images (same loop in both).
MODEL_CLASSES = ("Qwen2VLModel", "Qwen2_5_VLModel")


def batched_rope_index(
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor,
    attention_mask: torch.Tensor | None,
    spatial_merge_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids [3, B, L], deltas [B, 1]) as get_rope_index gives them, for image inputs.

    mm_token_type_ids: 0 text, 1 image; image_grid_thw: (t, h, w) per image in the order the
    images appear, row by row. Masked-out tokens get position 0, as in transformers.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    valid = (
        attention_mask.bool()
        if attention_mask is not None
        else torch.ones_like(input_ids, dtype=torch.bool)
    )
    # Each row's unmasked tokens first, in their order (a stable sort of "is masked").
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    counts = valid.sum(dim=1, keepdim=True)
    j = torch.arange(length, device=device).expand(batch, length)
    kept = j < counts  # [B, L] in the compacted order
    types = torch.where(kept, mm_token_type_ids.gather(1, order).long(), -1)

    vision = types > 0
    before = torch.cat([torch.full_like(types[:, :1], -2), types[:, :-1]], dim=1)
    after = torch.cat([types[:, 1:], torch.full_like(types[:, :1], -2)], dim=1)
    starts = vision & (types != before)  # an image's first token
    ends = vision & (types != after)  # its last
    # Images are numbered row by row, in order, as transformers' iterator over image_grid_thw.
    # (Clamped: more image blocks than grids is the processor's error, which the model's
    # forward reports; an index past the end would be a device-side assert here.)
    grids = image_grid_thw.to(device=device, dtype=torch.long)
    image = torch.cumsum(starts.flatten(), 0).view(batch, length) - 1
    grid = grids[image.clamp(0, len(grids) - 1)]  # [B, L, 3]
    h = grid[..., 1] // spatial_merge_size
    w = grid[..., 2] // spatial_merge_size

    text = kept & ~vision
    step = torch.where(text, 1, 0) + torch.where(ends, torch.maximum(h, w), 0)
    start = torch.cumsum(step, dim=1) - step  # where this token's segment begins
    first = torch.cummax(torch.where(starts, j, 0), dim=1).values
    k = j - first  # index within the image's block, row-major over (t, h, w)
    spatial = h * w
    vision_ids = torch.stack([k // spatial, (k // w) % h, k % w]) + start
    compact = torch.where(vision, vision_ids, start.expand(3, batch, length))

    position_ids = torch.zeros(3, batch, length, dtype=input_ids.dtype, device=device)
    position_ids.scatter_(
        2, order.expand(3, batch, length), torch.where(kept, compact, 0).to(position_ids.dtype)
    )
    highest = torch.where(kept, compact, torch.iinfo(torch.long).min).amax(dim=(0, 2))
    deltas = (highest + 1 - counts.squeeze(1)).unsqueeze(1)
    return position_ids, deltas


def _rope_index(original: Any, merge: int, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
    """get_rope_index's signature; the batched path for images, the original for anything else.

    Keyword arguments the loop does not read are ignored, as the loop ignores them: `generate`
    passes all of its model kwargs along (pixel_values, the cache...).
    """
    names = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw")
    given = dict(zip(names, args, strict=False)) | kwargs
    if (
        given.get("video_grid_thw") is not None
        or given.get("second_per_grid_ts") is not None  # videos' time scale (Qwen2.5-VL)
        or given.get("image_grid_thw") is None
        or len(given["image_grid_thw"]) == 0
        or given.get("mm_token_type_ids") is None
        or len(args) > len(names)
    ):
        return original(input_ids, *args, **kwargs)
    return batched_rope_index(
        input_ids,
        given["mm_token_type_ids"],
        given["image_grid_thw"],
        given.get("attention_mask"),
        merge,
    )


def enable_batched_rope_index(model: Any) -> bool:
    """Give a Qwen2-VL / Qwen2.5-VL model batched_rope_index as its get_rope_index; True if done.

    Set on the instance (the class and other models are untouched); PEFT and Unsloth wrappers
    are looked through.
    """
    base = unwrapped(model)
    inner = next(
        (m for m in base.modules() if type(m).__name__ in MODEL_CLASSES),
        None,
    )
    if inner is None or getattr(inner.get_rope_index, "func", None) is _rope_index:
        return False
    merge = inner.config.vision_config.spatial_merge_size
    inner.get_rope_index = partial(_rope_index, inner.get_rope_index, merge)
    log.info("rope position ids: computed for the whole batch at once (%s)", type(inner).__name__)
    return True
