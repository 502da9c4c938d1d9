"""Fake model APIs for the engine tests: a real HTTP server on 127.0.0.1 that speaks the shapes
of shared/upstreams.md for Ark (Seedream), Gemini (nano-banana) and OpenAI-compatible images.

It checks what it is sent the way the vendors do (credentials, known fields, sizes, reference
counts, data URLs that decode) and answers 400 in the vendor's error shape when something is
wrong, so an engine that builds a bad request fails its tests. It answers with real PNGs of the
size the vendor would make, as inline base64 or as links to itself that can be made to expire.
A test can put scripted answers in front (`Scripted`): errors, `Retry-After`, slow answers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.parser
import email.policy
import hashlib
import io
import json
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

KEY = "sk-fake-upstream-key"

# Seedream on ModelArk as docs/catalogue.md §3.3 reads its (third-party) sources, the stricter
# figure where they disagree: each id's sizes (pixels, or 3.0's sides), references, batching.
ARK_PIXELS = {
    "seedream-5-0-260128": (3_686_400, 10_404_496),
    "seedream-4-5-251128": (3_686_400, 16_777_216),
    "seedream-4-0-250828": (921_600, 16_777_216),
}
ARK_SIDES = {"seedream-3-0-t2i-250415": (512, 2048)}
ARK_MODELS = set(ARK_PIXELS) | set(ARK_SIDES)
ARK_REFERENCES = {
    "seedream-5-0-260128": 14,
    "seedream-4-5-251128": 10,
    "seedream-4-0-250828": 10,
    "seedream-3-0-t2i-250415": 0,  # text to image only
}
ARK_SEQUENTIAL = {"seedream-5-0-260128", "seedream-4-5-251128", "seedream-4-0-250828"}
ARK_CALL_IMAGES = 15  # references + images made
ARK_FIELDS = {
    "model",
    "prompt",
    "image",
    "size",
    "seed",
    "guidance_scale",
    "sequential_image_generation",
    "sequential_image_generation_options",
    "response_format",
    "watermark",
    "stream",
}
# The sizes Gemini answers with for each aspect ratio at imageSize "1K" (its 1k table); "2K"
# is twice each side, "4K" four times, "512" half (docs/catalogue.md §3.1).
GEMINI_SIZES = {
    "1:1": (1024, 1024),
    "2:3": (832, 1248),
    "3:2": (1248, 832),
    "3:4": (864, 1184),
    "4:3": (1184, 864),
    "4:5": (896, 1152),
    "5:4": (1152, 896),
    "9:16": (768, 1344),
    "16:9": (1344, 768),
    "21:9": (1536, 672),
}
# 3.1 Flash's extreme ratios (third parties only; sizes inferred, about a megapixel).
GEMINI_EXTREME_SIZES = {
    "1:4": (512, 2048),
    "4:1": (2048, 512),
    "1:8": (384, 3072),
    "8:1": (3072, 384),
}
GEMINI_SCALES = {"512": 0.5, "1K": 1, "2K": 2, "4K": 4}


@dataclass(frozen=True)
class GeminiModel:
    image_sizes: tuple[str, ...]  # empty: takes no imageSize (1K only)
    max_images: int  # inline images in one request
    ratios: frozenset[str]


# The image models the Gemini API serves today (docs/catalogue.md §3.1: G1, G4, third parties).
# Any other id (gemini-2.5-flash-image, past its October 2, 2026 shutdown) is answered 404.
GEMINI_MODELS = {
    "gemini-3-pro-image": GeminiModel(("1K", "2K", "4K"), 14, frozenset(GEMINI_SIZES)),
    "gemini-3.1-flash-image": GeminiModel(
        ("512", "1K", "2K", "4K"), 14, frozenset(GEMINI_SIZES) | frozenset(GEMINI_EXTREME_SIZES)
    ),
}
# What 2.5 Flash Image was before its shutdown: 1K only, 3 images (a test may serve it again).
GEMINI_2_5_FLASH = GeminiModel((), 3, frozenset(GEMINI_SIZES))
OPENAI_FIELDS = {"model", "prompt", "n", "size", "response_format", "output_format", "quality"}
# Shut down (docs/catalogue.md §3.2): answered as OpenAI answers a removed model.
OPENAI_REMOVED = {"gpt-image-1", "gpt-image-1.5", "gpt-image-1.5-2025-12-16", "gpt-image-1-mini"}
# gpt-image-2's sizes (docs/catalogue.md §3.2); other names (local servers) take any size.
GPT_IMAGE_2_MULTIPLE, GPT_IMAGE_2_SIDE, GPT_IMAGE_2_RATIO = 16, 3840, 3
GPT_IMAGE_2_PIXELS = (655_360, 8_294_400)
GEMINI_BAD_KEY = {
    "error": {
        "code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
        ],
    }
}
REFUSED_WORD = "forbidden"  # a prompt with it is refused as a content-policy violation


@dataclass(frozen=True)
class Scripted:
    """An answer given instead of the normal one (then the next, then normal answers)."""

    status: int
    body: Any = None  # JSON; None: the vendor's error shape for the status
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or for multipart {"fields": {...}, "images": [PIL images]}


class FakeUpstream:
    def __init__(self) -> None:
        self.seen: list[Seen] = []  # API calls
        self.downloads: list[Seen] = []  # output links fetched
        self.script: deque[Scripted] = deque()
        self.delay = 0.0  # before every normal answer
        # Cleared, normal answers wait until it is set again (30 s at most): jobs held running.
        self.answering = threading.Event()
        self.answering.set()
        self.links_expired = False  # output links answer 403, as a signed link past its time
        self.links_redirect = False  # output links answer 302 to where the file is
        self.ark_max_images: int | None = None  # Seedream may return fewer than asked
        self.gemini_models = dict(GEMINI_MODELS)  # a test may add a model Google removed
        # Images made this many times smaller on each side than the size asked for (the
        # engines resample them; the answer's `size` still says the size asked for): cheap
        # answers for tests that ask for many 4k images.
        self.shrink = 1
        self._files: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def calls(self, fragment: str) -> list[Seen]:
        return [seen for seen in self.seen if fragment in seen.path and seen.method == "POST"]

    # -- answers --------------------------------------------------------------------------

    def _answer(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Any:
        if method == "GET" and path.startswith("/redirect/"):  # to storage, as CDNs do
            with self._lock:
                self.downloads.append(Seen(method, path, headers, None))
            return 302, b"", {"location": path.replace("/redirect/", "/files/", 1)}
        if method == "GET" and path.startswith("/files/"):
            with self._lock:
                self.downloads.append(Seen(method, path, headers, None))
            return self._file(path.removeprefix("/files/"))
        vendor = _vendor(path)
        if vendor is None:
            return 404, {"error": {"message": f"no route {path}"}}, {}
        try:
            body = _parse(headers, raw)
        except Invalid as invalid:
            return 400, _error(vendor, Scripted(400), str(invalid)), {}
        with self._lock:
            self.seen.append(Seen(method, path, headers, body))
            scripted = self.script.popleft() if self.script else None
        if scripted is not None:
            time.sleep(scripted.delay)
            answer = scripted.body if scripted.body is not None else _error(vendor, scripted)
            return scripted.status, answer, scripted.headers
        time.sleep(self.delay)
        self.answering.wait(30)
        if not _authorised(vendor, headers):
            if vendor == "gemini":  # Gemini answers a bad key with a 400, not a 401
                return 400, GEMINI_BAD_KEY, {}
            return 401, _error(vendor, Scripted(401), "Invalid API key"), {}
        try:
            if vendor == "ark":
                return 200, self._ark(body), {}
            if vendor == "gemini":
                return 200, self._gemini(path, body), {}
            return 200, self._openai(path, body), {}
        except Invalid as invalid:
            return 400, _error(vendor, Scripted(400), str(invalid)), {}
        except Answered as answered:
            return answered.status, answered.body, {}
        except Removed as removed:
            message = f"The model `{removed}` does not exist or you do not have access to it."
            error = {"message": message, "type": "invalid_request_error", "code": "model_not_found"}
            return 404, {"error": error}, {}

    def _ark(self, body: Any) -> Any:
        _require(isinstance(body, dict), "body must be a JSON object")
        unknown = set(body) - ARK_FIELDS
        _require(not unknown, f"unknown parameter {sorted(unknown)}")
        _require(body.get("model") in ARK_MODELS, f"The model {body.get('model')} does not exist")
        prompt = body.get("prompt")
        _require(isinstance(prompt, str) and bool(prompt), "prompt is required")
        width, height = _size(body.get("size"))
        model = body["model"]
        if model in ARK_PIXELS:
            low, high = ARK_PIXELS[model]
            _require(
                low <= width * height <= high,
                f"The parameter `size` specified in the request is not valid: {width}x{height} "
                f"is outside {low}-{high} pixels for model {model}",
            )
        else:
            low, high = ARK_SIDES[model]
            _require(
                low <= min(width, height) and max(width, height) <= high,
                f"The parameter `size` specified in the request is not valid: {width}x{height} "
                f"is outside sides {low}-{high} for model {model}",
            )
        sequential = {"sequential_image_generation", "sequential_image_generation_options"}
        _require(
            model in ARK_SEQUENTIAL or not sequential & set(body),
            f"The parameter `sequential_image_generation` is not supported by model {model}",
        )
        _require(isinstance(body.get("watermark", True), bool), "watermark must be a boolean")
        images = body.get("image", [])
        images = [images] if isinstance(images, str) else images
        _require(isinstance(images, list), "image must be a string or a list")
        _require(
            len(images) <= ARK_REFERENCES[model],
            f"The parameter `image` specified in the request is not valid: model {model} takes "
            f"at most {ARK_REFERENCES[model]} images",
        )
        for url in images:
            _data_url(url)
        seed = body.get("seed", -1)
        _require(isinstance(seed, int) and -1 <= seed <= 2147483647, "seed out of range")
        count = 1
        if body.get("sequential_image_generation", "disabled") == "auto":
            options = body.get("sequential_image_generation_options", {})
            count = options.get("max_images", 15)
            _require(isinstance(count, int) and 1 <= count <= 15, "max_images out of range")
        else:
            _require(
                body.get("sequential_image_generation", "disabled") == "disabled", "bad sequential"
            )
        _require(
            count + len(images) <= ARK_CALL_IMAGES,
            "The total number of reference images and generated images must not exceed 15",
        )
        if self.ark_max_images is not None:
            count = min(count, self.ark_max_images)
        _require(body.get("response_format", "url") in ("url", "b64_json"), "response_format")
        if REFUSED_WORD in prompt:
            raise Invalid(
                "The request failed because the input text may contain sensitive information."
            )
        data = [
            self._output((width, height), f"{prompt}|{seed}|{n}", body.get("response_format"))
            for n in range(count)
        ]
        return {
            "model": body["model"],
            "created": int(time.time()),
            "data": data,
            "usage": {"generated_images": len(data), "output_tokens": 0, "total_tokens": 0},
        }

    def _gemini(self, path: str, body: Any) -> Any:
        found = re.fullmatch(r"/v1beta/models/([^/:]+):generateContent", path)
        _require(found is not None, "unknown method")
        assert found is not None
        model = self.gemini_models.get(found.group(1))
        if model is None:  # as Google answers an unknown or removed model
            message = (
                f"models/{found.group(1)} is not found for API version v1beta, "
                "or is not supported for generateContent."
            )
            raise Answered(404, {"error": {"code": 404, "message": message, "status": "NOT_FOUND"}})
        _require(isinstance(body, dict), "body must be a JSON object")
        contents = body.get("contents")
        _require(isinstance(contents, list) and len(contents) == 1, "one content")
        parts = contents[0].get("parts")
        _require(isinstance(parts, list) and bool(parts), "parts required")
        for part in parts:
            _require(isinstance(part, dict) and len(part) == 1, "a part has one field")
            _require(set(part) <= {"text", "inline_data"}, f"unknown part {sorted(part)}")
        text = " ".join(part["text"] for part in parts if "text" in part)
        inline = [part["inline_data"] for part in parts if "inline_data" in part]
        _require(len(inline) <= model.max_images, f"at most {model.max_images} input images")
        for image in inline:
            _require(image.get("mime_type") in ("image/jpeg", "image/png"), "mime_type")
            _decode_image(image.get("data"))
        config = body.get("generationConfig", {})
        _require(config.get("responseModalities") == ["IMAGE"], "responseModalities")
        image_config = config.get("imageConfig", {})
        _require(set(image_config) <= {"aspectRatio", "imageSize"}, "unknown imageConfig field")
        ratio = image_config.get("aspectRatio", "1:1")
        _require(ratio in model.ratios, f"aspectRatio {ratio} not supported")
        if "imageSize" in image_config:
            size = image_config["imageSize"]
            _require(bool(model.image_sizes), "imageSize is not supported by this model")
            _require(size in model.image_sizes, f"imageSize {size} not supported")
        else:
            size = "1K"
        width, height = {**GEMINI_SIZES, **GEMINI_EXTREME_SIZES}[ratio]
        scale = GEMINI_SCALES[size]
        answer_size = (int(width * scale), int(height * scale))
        if REFUSED_WORD in text:
            return {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}}
        if "no picture" in text:
            return {
                "candidates": [
                    {
                        "content": {"parts": [{"text": "I cannot draw that."}], "role": "model"},
                        "finishReason": "STOP",
                    }
                ]
            }
        png = _png(answer_size, text)
        return {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [
                            {"text": "Here is your image."},
                            {"inlineData": {"mimeType": "image/png", "data": _b64(png)}},
                        ],
                    },
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": {"promptTokenCount": 10},
        }

    def _openai(self, path: str, body: Any) -> Any:
        if path == "/v1/images/edits":
            _require(isinstance(body, dict) and "fields" in body, "multipart/form-data required")
            fields, images = body["fields"], body["images"]
            _require(bool(images), "image is required")
            _require(set(fields) <= OPENAI_FIELDS, f"unknown parameter {sorted(fields)}")
            n = int(fields.get("n", "1"))
        else:
            _require(isinstance(body, dict), "body must be a JSON object")
            fields = body
            _require(set(fields) <= OPENAI_FIELDS, f"unknown parameter {sorted(fields)}")
            n = fields.get("n", 1)
            _require(isinstance(n, int), "n must be an integer")
        prompt = fields.get("prompt")
        _require(isinstance(prompt, str) and bool(prompt), "prompt is required")
        model = fields.get("model")
        _require(bool(model), "model is required")
        if model in OPENAI_REMOVED:
            raise Removed(model)
        _require(1 <= n <= 10, "n must be 1 to 10")
        size = _size(fields.get("size", "1024x1024"))
        if model == "gpt-image-2":
            _gpt_image_2_size(*size)
        if REFUSED_WORD in prompt:
            raise Invalid("Your request was rejected as a result of our safety system.")
        data = [
            self._output(size, f"{prompt}|{i}", fields.get("response_format") or "b64_json")
            for i in range(n)
        ]
        return {"created": int(time.time()), "data": data}

    def _output(self, size: tuple[int, int], seed: str, response_format: str | None) -> Any:
        png = _png((max(1, size[0] // self.shrink), max(1, size[1] // self.shrink)), seed)
        if response_format == "b64_json":
            return {"b64_json": _b64(png), "size": f"{size[0]}x{size[1]}"}
        name = hashlib.sha256(png).hexdigest()[:16] + ".png"
        with self._lock:
            self._files[name] = png
        route = "redirect" if self.links_redirect else "files"
        return {"url": f"{self.url}/{route}/{name}?X-Signature=abc", "size": f"{size[0]}x{size[1]}"}

    def _file(self, name: str) -> Any:
        name = name.split("?")[0]
        with self._lock:
            data = self._files.get(name)
        if self.links_expired:
            return (
                403,
                b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message>",
                {},
            )
        if data is None:
            return 404, b"not found", {}
        return 200, data, {"content-type": "image/png"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                headers = {key.lower(): value for key, value in self.headers.items()}
                status, body, extra = fake._answer(self.command, self.path, headers, raw)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                if "content-type" not in extra:
                    kind = "application/json" if not isinstance(body, bytes) else "text/plain"
                    self.send_header("content-type", kind)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                # the client may have given up (a cancelled or timed-out call)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

            do_GET = _serve
            do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@contextmanager
def fake_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    try:
        yield fake
    finally:
        fake.close()


class Invalid(Exception):
    """A request the real service would refuse with a 400."""


class Answered(Exception):
    """A refusal with its own status and body (not the vendor's usual 400)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


class Removed(Exception):
    """A request for a model OpenAI has shut down (a 404)."""


def _gpt_image_2_size(width: int, height: int) -> None:
    low, high = GPT_IMAGE_2_PIXELS
    multiple, max_side, max_ratio = GPT_IMAGE_2_MULTIPLE, GPT_IMAGE_2_SIDE, GPT_IMAGE_2_RATIO
    _require(
        width % multiple == 0 and height % multiple == 0,
        f"Invalid size '{width}x{height}'. Both edges must be multiples of {multiple}.",
    )
    _require(
        max(width, height) <= max_side, f"Invalid size '{width}x{height}'. Edges <= {max_side}."
    )
    _require(
        max(width, height) <= max_ratio * min(width, height),
        f"Invalid size '{width}x{height}'. Long:short at most {max_ratio}:1.",
    )
    _require(
        low <= width * height <= high,
        f"Invalid size '{width}x{height}'. Total pixels must be {low} to {high}.",
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise Invalid(message)


def _vendor(path: str) -> str | None:
    if path == "/api/v3/images/generations":
        return "ark"
    if path.startswith("/v1beta/models/"):
        return "gemini"
    if path in ("/v1/images/generations", "/v1/images/edits"):
        return "openai"
    return None


def _authorised(vendor: str, headers: dict[str, str]) -> bool:
    if vendor == "gemini":
        return headers.get("x-goog-api-key") == KEY
    return headers.get("authorization") == f"Bearer {KEY}"


def _error(vendor: str, scripted: Scripted, message: str | None = None) -> Any:
    text = message or f"fake {vendor} error {scripted.status}"
    if vendor == "ark":
        return {"error": {"code": "InvalidParameter", "message": text, "type": "BadRequest"}}
    if vendor == "gemini":
        return {"error": {"code": scripted.status, "message": text, "status": "INVALID_ARGUMENT"}}
    return {"error": {"message": text, "type": "invalid_request_error", "code": None}}


def _parse(headers: dict[str, str], raw: bytes) -> Any:
    kind = headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"content-type: " + kind.encode() + b"\r\n\r\n" + raw
        )
        fields: dict[str, str] = {}
        images: list[Image.Image] = []
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if name == "image[]":
                images.append(_open(payload))
            else:
                fields[str(name)] = payload.decode()
        return {"fields": fields, "images": images}
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _size(value: Any) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", value) if isinstance(value, str) else None
    _require(match is not None, f"size {value!r} is not WIDTHxHEIGHT")
    assert match is not None
    width, height = int(match.group(1)), int(match.group(2))
    _require(64 <= width <= 8192 and 64 <= height <= 8192, "size out of range")
    return width, height


def _data_url(url: Any) -> Image.Image:
    _require(isinstance(url, str), "image must be a string")
    match = re.fullmatch(r"data:image/(jpeg|png|webp);base64,(.+)", url, re.DOTALL)
    _require(match is not None, "image must be a URL or a data:image/<fmt>;base64 URL")
    assert match is not None
    return _decode_image(match.group(2))


def _decode_image(data: Any) -> Image.Image:
    _require(isinstance(data, str), "image data must be base64")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid("image data is not base64") from None
    _require(len(raw) <= 10 << 20, "image larger than 10 MB")
    return _open(raw)


def _open(raw: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return image.copy()
    except OSError:
        raise Invalid("image cannot be decoded") from None


def _png(size: tuple[int, int], seed: str) -> bytes:
    """A real PNG of `size`: a gradient whose colours come from `seed`."""
    digest = hashlib.sha256(seed.encode()).digest()
    start, end = digest[:3], digest[3:6]
    strip = Image.linear_gradient("L").resize(size)
    image = Image.merge(
        "RGB",
        [
            strip.point(lambda v, a=a, b=b: a + (b - a) * v // 255)
            for a, b in zip(start, end, strict=True)
        ],
    )
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
