"""The per-row image pipeline: every Pillow mode becomes RGB, sizes land in bounds on the patch grid,
and every bad input is rejected with a sentence that says what is wrong."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlm_ray.data.images import ImageRejected, ImageRules, process_image, target_size

RULES = ImageRules(min_size=300, max_size=1000, patch_multiple=28)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A real-looking RGB picture: a gradient, noise and some drawn shapes."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    arr = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, w // 2, h // 2), fill=(200, 30, 30))
    return img


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def rejection(data: bytes, rules: ImageRules = RULES) -> str:
    with pytest.raises(ImageRejected) as err:
        process_image(data, rules)
    return err.value.reason


def test_large_photo_is_downscaled_into_bounds_on_the_patch_grid() -> None:
    out, w, h = process_image(encode(photo(2000, 1500), "JPEG"), RULES)
    img = decoded(out)
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (w, h)
    assert (w, h) == (980, 728)  # long side nearest multiple of 28 within 1000; ratio kept
    assert w % 28 == 0 and h % 28 == 0


def test_tiny_scan_is_upscaled_to_the_minimum_cleanly() -> None:
    # an 8x8 scan, like sklearn digits
    digit = Image.fromarray((np.eye(8) * 255).astype(np.uint8), "L")
    out, w, h = process_image(
        encode(digit), ImageRules(min_size=56, max_size=56, patch_multiple=28)
    )
    img = decoded(out)
    assert (w, h) == (56, 56) and img.mode == "RGB"
    # the diagonal stroke survives the upscale: bright on the diagonal, dark off it
    assert img.getpixel((3, 3))[0] > 200 and img.getpixel((52, 3))[0] < 60


def test_sizes_keep_aspect_ratio_and_stay_within_bounds() -> None:
    for w, h in [(300, 300), (1000, 10), (10, 999), (4000, 3000), (301, 299), (640, 480)]:
        nw, nh = target_size(w, h, RULES)
        assert nw % 28 == 0 and nh % 28 == 0
        assert 300 <= max(nw, nh) <= 1000
        # the short side is the scaled short side rounded to the grid (never below one patch)
        (lw, sw), (ln, sn) = sorted((w, h), reverse=True), sorted((nw, nh), reverse=True)
        assert abs(sn - max(sw * ln / lw, 14)) <= 14
        assert (nw >= nh) == (w >= h)


@pytest.mark.parametrize(
    ("mode", "make", "expected_corner"),
    [
        ("CMYK", lambda: Image.new("CMYK", (400, 300), (0, 255, 255, 0)), (255, 0, 0)),
        ("RGBA", lambda: Image.new("RGBA", (400, 300), (255, 0, 0, 0)), (255, 255, 255)),
        ("LA", lambda: Image.new("LA", (400, 300), (0, 0)), (255, 255, 255)),
        ("P+transparency", lambda: _palette_with_transparency(), (255, 255, 255)),
        ("1", lambda: Image.new("1", (400, 300), 0), (0, 0, 0)),
        ("L", lambda: Image.new("L", (400, 300), 77), (77, 77, 77)),
        ("I;16", lambda: _sixteen_bit(), (128, 128, 128)),
        ("I", lambda: Image.fromarray(np.full((300, 400), 65535, np.int32)), (255, 255, 255)),
        ("F", lambda: Image.fromarray(np.full((300, 400), 0.5, np.float32)), (128, 128, 128)),
    ],
)
def test_every_pillow_mode_becomes_8bit_rgb(mode: str, make, expected_corner) -> None:
    img = make()
    fmt = "TIFF" if img.mode in ("CMYK", "I", "F") else "PNG"
    out, _, _ = process_image(encode(img, fmt), RULES)
    result = decoded(out)
    assert result.mode == "RGB", mode
    assert result.getpixel((0, 0)) == pytest.approx(expected_corner, abs=2), mode


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (400, 300), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    return img


def _sixteen_bit() -> Image.Image:
    img = Image.fromarray(np.full((300, 400), 128 * 257, np.uint16))
    assert img.mode == "I;16"
    return img


def test_animated_gif_keeps_the_first_frame() -> None:
    frames = [Image.new("RGB", (300, 200), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out, _, _ = process_image(data, RULES)
    assert decoded(out).getpixel((10, 10)) == pytest.approx((255, 0, 0), abs=3)


def test_exif_orientation_is_applied() -> None:
    img = photo(600, 300)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    _, w, h = process_image(encode(img, "JPEG", exif=exif), RULES)
    assert h > w  # a landscape sensor image shown as portrait


def test_jpeg_output_when_asked() -> None:
    out, _, _ = process_image(
        encode(photo(500, 400)),
        ImageRules(image_format="jpeg", min_size=300, max_size=1000, patch_multiple=28),
    )
    assert decoded(out).format == "JPEG"


@pytest.mark.parametrize(
    ("name", "data", "reason_start"),
    [
        ("zero bytes", b"", "empty file: 0 bytes"),
        ("not an image", b"%PDF-1.4 this is a document", "not an image"),
        ("truncated PNG", encode(photo(400, 300))[:4000], "truncated PNG"),
        ("truncated JPEG", encode(photo(400, 300), "JPEG")[:3000], "truncated JPEG"),
        ("1x1 px", encode(Image.new("RGB", (1, 1))), "image too small: 1x1 px"),
        ("extreme ratio", encode(Image.new("RGB", (5000, 20))), "extreme aspect ratio: 5000x20 px"),
    ],
)
def test_bad_image_is_rejected_with_reason(name: str, data: bytes, reason_start: str) -> None:
    assert rejection(data).startswith(reason_start), name


def test_decompression_bomb_is_rejected_from_the_header_at_the_spec_limit() -> None:
    bomb = encode(Image.new("L", (1200, 1000)))
    rules = ImageRules(max_image_pixels=1_000_000)
    assert rejection(bomb, rules) == (
        "decompression bomb: 1200000 px > limit 1000000 (data.max_image_pixels)"
    )
    # far over the limit Pillow raises instead of warning; still the spec's limit in the message
    assert "3000000 px > limit 1000000" in rejection(encode(Image.new("L", (3000, 1000))), rules)
    assert Image.MAX_IMAGE_PIXELS == 1_000_000  # set from the spec, never disabled


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_randomly_corrupted_files_are_either_processed_or_rejected_never_crash() -> None:
    import random

    rng = random.Random(0)
    originals = [encode(photo(120, 90), fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "TIFF")]
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(300):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        try:
            out, w, h = process_image(bytes(data), RULES)
            assert decoded(out).size == (w, h)
            outcomes["ok"] += 1
        except ImageRejected as err:
            assert err.reason  # any other exception type fails the test
            outcomes["rejected"] += 1
    assert outcomes["ok"] > 0 and outcomes["rejected"] > 0
