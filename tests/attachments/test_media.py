"""Thumbnails as a supervisor sees them, and what making one costs, read before decoding."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from fieldsync.attachments._media import TYPES, ThumbnailTooLarge, thumbnail, thumbnail_cost

MAX_PIXELS = 64_000_000
NO_LIMIT = 1 << 40


def saved(tmp_path: Path, image: Image.Image, fmt: str, **options: object) -> Path:
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, fmt, **options)
    return path


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple), value
    return value


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_a_photo_is_turned_as_its_camera_says_once_it_is_small(tmp_path: Path) -> None:
    """Turned after shrinking (turning copies the image): the result is the same."""
    photo = Image.new("RGB", (800, 400), "white")
    photo.paste("red", (0, 0, 400, 400))  # the left half red, as the sensor saw it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; rotate 90° clockwise to view
    path = saved(tmp_path, photo, "JPEG", exif=exif.tobytes())
    small = opened(thumbnail(path, TYPES["image/jpeg"], MAX_PIXELS, NO_LIMIT))
    assert small.size == (128, 256)  # upright: portrait
    red, green, blue = pixel(small.convert("RGB"), (64, 20))  # the top is the red half
    assert red > 200
    assert green < 60
    assert blue < 60


def test_transparency_goes_onto_white(tmp_path: Path) -> None:
    signature = Image.new("RGBA", (600, 300), (0, 0, 0, 0))
    signature.paste((0, 0, 128, 255), (0, 140, 600, 160))  # a stroke across a clear canvas
    small = opened(thumbnail(saved(tmp_path, signature, "PNG"), TYPES["image/png"], 10**8, 10**9))
    assert small.format == "JPEG"
    assert small.size == (256, 128)
    assert small.getpixel((5, 5)) == (255, 255, 255)
    assert pixel(small, (128, 64))[2] > pixel(small, (128, 64))[0] + 60  # the blue stroke


@pytest.mark.parametrize(
    ("fmt", "mode", "side", "cost"),
    [
        # JPEG decodes at 1/4 of 4000, RGB in 4 bytes (1/8 would be less than twice 256 px).
        ("JPEG", "RGB", 4000, 1000 * 1000 * 4),
        ("JPEG", "RGB", 8000, 1000 * 1000 * 4),
        ("PNG", "RGB", 2000, 2000 * 2000 * 4),  # whole, 4 bytes a pixel
        ("PNG", "RGBA", 2000, 2000 * 2000 * 4 * 2),  # and a premultiplied copy
        ("PNG", "L", 2000, 2000 * 2000),
        ("WEBP", "RGB", 1000, 1000 * 1000 * 4 * 4),  # the decoder's buffers too
    ],
)
def test_the_cost_is_read_from_the_header(
    tmp_path: Path, fmt: str, mode: str, side: int, cost: int
) -> None:
    path = saved(tmp_path, Image.new(mode, (side, side)), fmt)
    media = TYPES[f"image/{fmt.lower()}"]
    assert thumbnail_cost(path, media, MAX_PIXELS) == cost
    with pytest.raises(ThumbnailTooLarge, match="too large to thumbnail"):
        thumbnail(path, media, MAX_PIXELS, cost - 1)
    assert opened(thumbnail(path, media, MAX_PIXELS, cost)).size == (256, 256)
