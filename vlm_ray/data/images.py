"""One image in, one training-ready image out: decode, verify, orient, RGB, resize, patch-snap, encode.

Every way an input can be unusable raises `ImageRejected` with a sentence a
person understands; the caller quarantines the row and goes on.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageRejected(ValueError):
    """An image that cannot be used; `reason` says why in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageRules:
    """The geometry and safety limits every prepared image obeys (from the job spec and model family)."""

    min_size: int = 300  # smallest long side after resizing (upscaled to reach it)
    max_size: int = 1000  # largest long side after resizing
    patch_multiple: int = 28  # both sides are snapped to a multiple of this
    max_aspect_ratio: float = (
        200.0  # long/short side; beyond it the model family cannot take the image
    )
    max_image_pixels: int = 178_956_970  # decompression-bomb limit (Pillow's MAX_IMAGE_PIXELS)
    min_side: int = 8  # a source image smaller than this on either side carries no content
    image_format: str = "png"  # png | jpeg


# Upscaling small scans (e.g. 8x8 digits) with bicubic keeps strokes smooth;
# Lanczos is the quality choice for downscaling photos. Both are explicit here
# so the stored pixels never depend on a library default.
UPSCALE = Image.Resampling.BICUBIC
DOWNSCALE = Image.Resampling.LANCZOS
_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit")


def process_image(data: bytes, rules: ImageRules | None = None) -> tuple[bytes, int, int]:
    """Decode, check and normalise one image; returns (PNG/JPEG bytes, width, height) or raises ImageRejected."""
    rules = rules or ImageRules()
    img, fmt = open_verified(data, rules.max_image_pixels)
    w, h = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as err:
        raise ImageRejected(f"corrupt EXIF in {fmt}: {type(err).__name__}: {err}") from None
    if orientation in (5, 6, 7, 8):  # EXIF says "rotate by 90 degrees": the stored sides swap
        w, h = h, w
    if min(w, h) < rules.min_side:
        raise ImageRejected(
            f"image too small: {w}x{h} px; both sides must be at least {rules.min_side} px (data.min_image_side)"
        )
    ratio = max(w, h) / min(w, h)
    if ratio > rules.max_aspect_ratio:
        raise ImageRejected(
            f"extreme aspect ratio: {w}x{h} px is {ratio:.1f}:1, over the model family's limit "
            f"{rules.max_aspect_ratio:g}:1 (data.max_aspect_ratio)"
        )
    new_w, new_h = target_size(w, h, rules)
    if fmt == "JPEG" and new_w < w:
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the target):
        # several times faster on large photos, and still deterministic.
        img.draft(None, (new_h, new_w) if orientation in (5, 6, 7, 8) else (new_w, new_h))
    img = load_first_frame(img, fmt)
    img = to_rgb(img)
    if img.size != (new_w, new_h):
        upscale = new_w * new_h > img.size[0] * img.size[1]
        img = img.resize((new_w, new_h), UPSCALE if upscale else DOWNSCALE, reducing_gap=3.0)
    return encode_image(img, rules.image_format), new_w, new_h


_EXIF_ORIENTATION = 0x0112


def open_verified(data: bytes, max_image_pixels: int) -> tuple[Image.Image, str]:
    """Open (header only) after a structural verify; raises ImageRejected for empty, non-image, corrupt or bomb input."""
    if not data:
        raise ImageRejected("empty file: 0 bytes")
    # Pillow checks the bomb limit from the header, before any pixel is decoded.
    # It only warns between 1x and 2x the limit, so the warning is made an error:
    # the limit in the spec is the limit.
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    fmt = "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format or fmt
                probe.verify()  # structural check (PNG chunk CRCs, etc.) without decoding
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        m = _BOMB.search(str(err))
        # Pillow's hard error quotes twice the limit; report the spec's limit.
        size = f"{m.group(1)} px > limit {max_image_pixels}" if m else str(err)
        raise ImageRejected(f"decompression bomb: {size} (data.max_image_pixels)") from None
    except UnidentifiedImageError:
        raise ImageRejected(
            f"not an image: Pillow cannot identify the format ({len(data)} bytes starting {data[:12]!r})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageRejected(_defect(fmt, err)) from None
    except (
        Exception
    ) as err:  # malformed files reach odd corners of the decoders (struct.error, ...)
        raise ImageRejected(f"unreadable {fmt}: {type(err).__name__}: {err}") from None
    return img, fmt


def load_first_frame(img: Image.Image, fmt: str) -> Image.Image:
    """Decode the pixels of the first frame (animated GIF/WebP/APNG) and apply EXIF orientation."""
    try:
        img.seek(0)
        img.load()
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageRejected(_defect(fmt, err)) from None
    except (
        Exception
    ) as err:  # a malformed EXIF block or frame must reject the row, not kill the shard
        raise ImageRejected(f"unreadable {fmt}: {type(err).__name__}: {err}") from None


def _defect(fmt: str, err: Exception) -> str:
    kind = "truncated" if "truncat" in str(err).lower() else "corrupt"
    return f"{kind} {fmt}: {err}"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited over white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise ImageRejected(f"unsupported colour mode {mode}: {err}") from None


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float greyscale to 8 bits by scaling, not clipping."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        # float images are either 0..1 (normalised) or already 0..255
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
    else:
        top = float(arr.max()) if arr.size else 0.0
        # 16-bit data (I;16*, or I from a 16-bit PNG) spans 0..65535
        if img.mode.startswith("I;16") or 255.0 < top <= 65535.0:
            arr = arr / 257.0
        elif top > 65535.0:
            arr = arr * (255.0 / top)
    gray = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def snap(side: float, multiple: int, lo: int, hi: int) -> int:
    """The multiple of `multiple` nearest to side, preferring one within [lo, hi]."""
    down = max(multiple, int(side // multiple) * multiple)
    up = down + multiple if down < side else down
    inside = [c for c in (down, up) if lo <= c <= hi]
    candidates = inside or [down, up]
    return min(candidates, key=lambda c: (abs(c - side), c))


def target_size(w: int, h: int, rules: ImageRules) -> tuple[int, int]:
    """Keep the aspect ratio, bring the long side into [min_size, max_size], snap both sides to the patch multiple."""
    long_side = max(w, h)
    goal = min(max(long_side, rules.min_size), rules.max_size)
    scale = goal / long_side
    m = rules.patch_multiple
    if w >= h:
        new_w = snap(w * scale, m, rules.min_size, rules.max_size)
        new_h = snap(h * new_w / w, m, 1, new_w)
    else:
        new_h = snap(h * scale, m, rules.min_size, rules.max_size)
        new_w = snap(w * new_h / h, m, 1, new_h)
    return new_w, new_h


def encode_image(img: Image.Image, image_format: str) -> bytes:
    """PNG (lossless; zlib level 1: on photos ~2% larger than level 3, ~30% faster) or JPEG quality 95."""
    buf = io.BytesIO()
    if image_format == "jpeg":
        img.save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
