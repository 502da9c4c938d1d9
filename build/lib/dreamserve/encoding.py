"""How the server encodes the images it stores: the format and each format's setting, from
Settings (`DREAMSERVE_IMAGE_FORMAT`, `DREAMSERVE_JPEG_QUALITY`, ...) through the runner's config;
and each format's file extension and content type.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, PngImagePlugin

from dreamserve.settings import ImageFormat

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_TYPE_OF_EXTENSION = {
    EXTENSIONS[name]: content_type for name, content_type in CONTENT_TYPES.items()
}


@dataclass(frozen=True)
class Encoding:
    image_format: ImageFormat = "jpeg"
    jpeg_quality: int = 92  # 1-100
    png_compress_level: int = 6  # 0 (none, fastest) to 9 (smallest); lossless at every level
    webp_quality: int = 90  # 0-100, lossy


def encode(image: Image.Image, encoding: Encoding) -> bytes:
    """The image as a file of `encoding.image_format`, keeping its `comment` (the engine's
    label)."""
    buffer = io.BytesIO()
    rgb = image.convert("RGB") if image.mode not in ("RGB", "L") else image
    comment = str(image.info.get("comment", ""))
    if encoding.image_format == "jpeg":
        rgb.save(buffer, "JPEG", quality=encoding.jpeg_quality, comment=comment)
    elif encoding.image_format == "png":
        info = PngImagePlugin.PngInfo()
        if comment:
            info.add_text("Comment", comment)
        rgb.save(buffer, "PNG", pnginfo=info, compress_level=encoding.png_compress_level)
    else:
        rgb.save(buffer, "WEBP", quality=encoding.webp_quality)
    return buffer.getvalue()


def content_type(key: str) -> str:
    """The Content-Type of a blob, from its key's extension."""
    return _TYPE_OF_EXTENSION.get(key.rpartition(".")[2], "application/octet-stream")
