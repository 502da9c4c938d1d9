"""Assets: uploaded images checked before anything is stored, and assets as GET /assets lists them.

An upload must be what its Content-Type says, decode completely, and stay within the pixel limit;
every refusal is a 400 that says which rule it broke. Decoding runs Pillow on untrusted bytes, so
any failure of the decoder counts as a bad image, never as a server error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO

from PIL import Image, UnidentifiedImageError

from dreamserve.errors import BadRequest

# Content-Type -> (Pillow format, the contract's format name)
ACCEPTED = {
    "image/jpeg": ("JPEG", "jpeg"),
    "image/png": ("PNG", "png"),
    "image/webp": ("WEBP", "webp"),
}
# What Pillow calls each accepted image: MPO is a JPEG with more pictures after the first (from
# cameras and phones); Pillow opens it as MPO.
_PILLOW_FORMATS = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
}
_ORIENTATION = 0x0112  # the EXIF tag
_QUARTER_TURNS = (5, 6, 7, 8)


@dataclass(frozen=True)
class CheckedImage:
    format: str  # jpeg, png or webp
    width: int
    height: int


def content_type_of(header: str | None) -> str:
    """The upload's media type, or the contract's 400 when it is not one we take."""
    media = (header or "").partition(";")[0].strip().lower()
    if media not in ACCEPTED:
        raise BadRequest(
            f"Content-Type ({media}) not supported. Valid values: {', '.join(ACCEPTED)}"
        )
    return media


def check_image(file: IO[bytes], media: str, max_pixels: int) -> CheckedImage:
    """Decode the whole of `file` (from its start) fully as `media`; BadRequest saying what is
    wrong with it otherwise."""
    if file.seek(0, os.SEEK_END) == 0:
        raise BadRequest("Image is empty")
    file.seek(0)
    name = ACCEPTED[media][1]
    try:
        with Image.open(file, formats=["JPEG", "PNG", "WEBP"]) as image:
            found = _PILLOW_FORMATS.get(str(image.format), str(image.format))
            if found != media:
                raise BadRequest(f"Image data is {found}, not {media}")
            width, height = image.size
            if width * height > max_pixels:
                raise _too_many_pixels(f"{width}x{height} pixels", max_pixels)
            image.load()
            if image.getexif().get(_ORIENTATION, 1) in _QUARTER_TURNS:
                width, height = height, width  # as it is shown, and as engines get it
    except BadRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels("a decompression bomb", max_pixels) from None
    except UnidentifiedImageError:
        raise BadRequest(f"Image data is not a valid {media} image") from None
    except Exception:  # whatever the decoder trips on in hostile bytes: truncated, corrupt
        raise BadRequest(
            f"Image data is truncated or corrupt (not a complete {media} image)"
        ) from None
    return CheckedImage(name, width, height)


def _too_many_pixels(what: str, limit: int) -> BadRequest:
    return BadRequest(f"Image has too many pixels: {what} (limit {limit} pixels)")


def too_large(limit: int) -> BadRequest:
    return BadRequest(f"Image is too large (limit {limit} bytes)")
