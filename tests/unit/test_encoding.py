"""The stored images' encoding: each format's setting is applied, within the bounds Settings
enforces, and the defaults are the ones the server always had."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from pydantic import ValidationError

from dreamserve.encoding import Encoding, encode
from dreamserve.engines.base import CancelSignal, GenerationRequest
from dreamserve.engines.procedural import render
from dreamserve.settings import Settings


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    request = GenerationRequest("a harbour at dusk", "seedream-4.0", 512, 384, 1, seed=3)
    image = render(request, 0, None, lambda fraction: None, CancelSignal())
    image.info["comment"] = "the engine's label"
    return image


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    ("encoding", "better"),
    [
        (Encoding("jpeg", jpeg_quality=30), Encoding("jpeg", jpeg_quality=95)),
        (Encoding("png", png_compress_level=9), Encoding("png", png_compress_level=0)),
        (Encoding("webp", webp_quality=10), Encoding("webp", webp_quality=95)),
    ],
)
def test_each_formats_setting_is_applied(
    picture: Image.Image, encoding: Encoding, better: Encoding
) -> None:
    small, large = encode(picture, encoding), encode(picture, better)
    assert len(small) < len(large)
    for data in (small, large):
        assert decoded(data).size == (512, 384)


def test_png_is_lossless_at_every_level(picture: Image.Image) -> None:
    fast = decoded(encode(picture, Encoding("png", png_compress_level=0)))
    small = decoded(encode(picture, Encoding("png", png_compress_level=9)))
    assert fast.tobytes() == small.tobytes() == picture.convert("RGB").tobytes()


def test_the_engines_label_is_kept(picture: Image.Image) -> None:
    assert decoded(encode(picture, Encoding("jpeg"))).info["comment"] == b"the engine's label"
    assert decoded(encode(picture, Encoding("png"))).info["Comment"] == "the engine's label"


def test_the_defaults_are_unchanged_and_the_same_in_settings() -> None:
    settings = Settings()
    assert (settings.jpeg_quality, settings.png_compress_level, settings.webp_quality) == (
        92,
        6,
        90,
    )
    assert Encoding() == Encoding(
        settings.image_format,
        settings.jpeg_quality,
        settings.png_compress_level,
        settings.webp_quality,
    )


def test_the_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMSERVE_JPEG_QUALITY", "75")
    monkeypatch.setenv("DREAMSERVE_PNG_COMPRESS_LEVEL", "9")
    monkeypatch.setenv("DREAMSERVE_WEBP_QUALITY", "0")
    settings = Settings()
    assert (settings.jpeg_quality, settings.png_compress_level, settings.webp_quality) == (75, 9, 0)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("jpeg_quality", 0),
        ("jpeg_quality", 101),
        ("png_compress_level", -1),
        ("png_compress_level", 10),
        ("webp_quality", -1),
        ("webp_quality", 101),
    ],
)
def test_values_pillow_does_not_take_are_refused(setting: str, value: int) -> None:
    with pytest.raises(ValidationError, match=setting):
        Settings(**{setting: value})
