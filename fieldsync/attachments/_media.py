"""What an attachment is, read from its bytes and never from its name or the client's word, and
the thumbnails of photos.

The types fieldsync knows are those a field app produces: photos (JPEG, PNG, WebP) and signed
documents (PDF). HEIC, the iPhone camera's default, is not among them: Pillow cannot read it
without libheif, so its dimensions could not be checked nor a thumbnail made; the apps send JPEG.
Which of the known types a server accepts is the `attachment_types` setting.

Everything here blocks (file reads, image decoding): run it in a worker thread.

Memory: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size for a thumbnail, but PNG and WebP can
only be decoded whole, four bytes a pixel in Pillow (an 8000 x 8000 PNG of 250 KB is 244 MiB
decoded). `thumbnail_cost` tells from the header what a thumbnail will hold at its peak, so the
caller can refuse or queue it before anything is decoded (imgproxy refuses sources above a pixel
limit for the same reason).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from PIL import Image, ImageOps, UnidentifiedImageError

from fieldsync.config import ATTACHMENT_TYPES
from fieldsync.errors import ErrorCode, FieldsyncError

__all__ = [
    "SNIFF_BYTES",
    "TYPES",
    "ImageTooLarge",
    "MediaType",
    "ThumbnailTooLarge",
    "UnsupportedMediaType",
    "inspect",
    "sniff",
    "thumbnail",
    "thumbnail_cost",
]


@dataclass(frozen=True, slots=True)
class MediaType:
    mime: str
    # Magic numbers: (offset, bytes) pairs that must all match.
    signature: tuple[tuple[int, bytes], ...]
    # Pillow's format name for images (their header is read for the dimensions); None otherwise.
    image: str | None = None


TYPES: Mapping[str, MediaType] = MappingProxyType(
    {
        t.mime: t
        for t in (
            # JPEG/JFIF/Exif: SOI marker then the first marker's 0xFF (ISO/IEC 10918-1 B.1.1.3).
            MediaType("image/jpeg", ((0, b"\xff\xd8\xff"),), "JPEG"),
            # The PNG signature (RFC 2083 §3.1).
            MediaType("image/png", ((0, b"\x89PNG\r\n\x1a\n"),), "PNG"),
            # A RIFF container of form type WEBP (RFC 9649 §2.5).
            MediaType("image/webp", ((0, b"RIFF"), (8, b"WEBP")), "WEBP"),
            # The PDF header (ISO 32000-2 §7.5.2).
            MediaType("application/pdf", ((0, b"%PDF-"),)),
        )
    }
)
if set(TYPES) != set(ATTACHMENT_TYPES):  # the setting's list and this table name the same types
    raise AssertionError("fieldsync.config.ATTACHMENT_TYPES and _media.TYPES disagree")

# Enough leading bytes to tell every type above apart.
SNIFF_BYTES = max(offset + len(magic) for t in TYPES.values() for offset, magic in t.signature)

THUMBNAIL_SIZE = 256  # pixels, the longer side
_THUMBNAIL_QUALITY = 80


class UnsupportedMediaType(FieldsyncError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNSUPPORTED_MEDIA_TYPE, message)


class ImageTooLarge(FieldsyncError):
    def __init__(self, pixels: int | None, limit: int) -> None:
        counted = f"{pixels} pixels" if pixels is not None else "too many pixels"
        super().__init__(
            ErrorCode.IMAGE_TOO_LARGE,
            f"the image has {counted}; at most {limit} are accepted",
            max_pixels=limit,
        )


class ThumbnailTooLarge(FieldsyncError):
    """An image accepted (under `attachment_max_pixels`) whose thumbnail would take more memory
    than thumbnailing may use: it stays downloadable, without a thumbnail."""

    def __init__(self, cost: int, limit: int) -> None:
        super().__init__(
            ErrorCode.NO_THUMBNAIL,
            f"the image is too large to thumbnail: decoding it takes {cost >> 20} MiB, "
            f"thumbnails may use {limit >> 20} MiB",
        )


def sniff(head: bytes) -> MediaType | None:
    """The known type whose magic number `head` (the content's first bytes) starts with."""
    for media in TYPES.values():
        if all(head[offset : offset + len(magic)] == magic for offset, magic in media.signature):
            return media
    return None


def inspect(path: Path, media: MediaType, max_pixels: int) -> tuple[int, int] | None:
    """The dimensions of an image read from its header alone, or None for a type that is not an
    image. Raises `ImageTooLarge` above `max_pixels` (a decompression bomb: a few KiB that decode
    to gigabytes), `UnsupportedMediaType` when the header is not a readable `media` header."""
    if media.image is None:
        return None
    with _open(path, media, max_pixels) as image:
        return image.size


def thumbnail_cost(path: Path, media: MediaType, max_pixels: int) -> int:
    """The bytes `thumbnail` holds at its peak for this image, read from its header alone."""
    if media.image is None:
        raise ValueError(f"{media.mime} is not an image")
    with _open(path, media, max_pixels) as image:
        return _decode_reduced(image)


def thumbnail(path: Path, media: MediaType, max_pixels: int, max_cost: int) -> bytes:
    """A JPEG at most `THUMBNAIL_SIZE` pixels on its longer side, turned as the camera's Exif
    orientation says. Raises `ThumbnailTooLarge`, before decoding, when that would hold more than
    `max_cost` bytes (`thumbnail_cost`)."""
    if media.image is None:
        raise ValueError(f"{media.mime} is not an image")
    with _open(path, media, max_pixels) as image:
        cost = _decode_reduced(image)
        if cost > max_cost:
            raise ThumbnailTooLarge(cost, max_cost)
        # Shrunk first, in place, and turned once small: turning (`exif_transpose`) copies the
        # whole image, which at full size doubled what a PNG cost.
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
        turned = ImageOps.exif_transpose(image)
        flat = _on_white(turned)
        out = io.BytesIO()
        flat.save(out, "JPEG", quality=_THUMBNAIL_QUALITY, optimize=True)
        return out.getvalue()


def _decode_reduced(image: Image.Image) -> int:
    """Ask for the smallest decoding a thumbnail can be made from (JPEG decodes straight at 1/2,
    1/4 or 1/8 scale: a 48-megapixel photo never exists in memory at full size; `draft` does
    nothing for other formats), and return the bytes making the thumbnail will then hold."""
    # Twice the thumbnail: `Image.thumbnail`'s reducing gap, so the last resampling has pixels
    # to average.
    image.draft("RGB", (2 * THUMBNAIL_SIZE, 2 * THUMBNAIL_SIZE))
    width, height = image.size
    copies = 1
    if image.mode in _PREMULTIPLIED:
        copies += 1  # Pillow resamples these premultiplied: a converted copy (`Image.resize`)
    if image.format == "WEBP":
        # libwebp's frame buffer, the bytes Pillow is handed, the image, and one more (as
        # measured with Pillow 13: peak four times the decoded frame, with or without alpha).
        copies = 4
    return width * height * _PIXEL_BYTES.get(image.mode, 4) * copies


# Bytes a pixel takes in Pillow's memory, by mode: everything else (RGB included) takes four.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}
_PREMULTIPLIED = frozenset({"LA", "RGBA"})


def _open(path: Path, media: MediaType, max_pixels: int) -> Image.Image:
    """Open lazily: Pillow reads the header (format, size) and decodes nothing until asked."""
    assert media.image is not None
    try:
        image = Image.open(path, formats=[media.image])
    except Image.DecompressionBombError:
        # Pillow's own guard (twice `Image.MAX_IMAGE_PIXELS`), before ours could look.
        raise ImageTooLarge(None, max_pixels) from None
    except Image.DecompressionBombWarning:
        # Its warning, raised where warnings are errors (the test suite): an image over
        # `Image.MAX_IMAGE_PIXELS`; refused below whatever `max_pixels` says.
        raise ImageTooLarge(None, max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UnsupportedMediaType(f"the content is not a readable {media.mime} image") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLarge(width * height, max_pixels)
    return image


def _on_white(image: Image.Image) -> Image.Image:
    """RGB for JPEG: transparency (a PNG signature drawn on a canvas) goes onto white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, "white")
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")
