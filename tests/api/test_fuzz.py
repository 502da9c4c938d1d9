"""No request body, however odd, gets a 500 or an error outside the {"error"} shape."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import Connection, func, select, update
from support import ASSET_REFS, GatedEngine, Harness, open_harness, public_dns
from support import IMAGE_FIELDS as FIELDS

from dreamserve.settings import Settings
from dreamserve.storage.tables import accounts, assets

CONTENT_TYPES = [
    "application/json",
    "multipart/form-data",
    "multipart/form-data; boundary=xyz",
    "application/x-www-form-urlencoded",
    "text/plain",
    "",
]
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=40)  # includes NUL and lone surrogates
    | ASSET_REFS
    | st.sampled_from(["nano-banana", "1:1", "auto", "2k", "LOCAL:procedural", "https://x.test/"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), values, max_size=8)
examples = partial(
    settings, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class Client:
    """A harness on an event loop in another thread, so that hypothesis can drive it."""

    def __init__(self, portal: BlockingPortal, harness: Harness) -> None:
        self.portal = portal
        self.harness = harness

    def post(self, **kwargs: Any) -> httpx.Response:
        headers = {**self.harness.auth, **kwargs.pop("headers", {})}
        post = partial(self.harness.client.post, "/v1/dreamina/images", headers=headers, **kwargs)
        reply = self.portal.call(post)
        assert reply.status_code in (200, 400, 404, 429), reply.text
        assert reply.headers["content-type"] == "application/json"
        if reply.status_code != 200:
            assert set(reply.json()) == {"error"}
        return reply

    def stored(self) -> tuple[int, int]:
        """(asset rows, files under blobs/) as they are now."""

        def count(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).select_from(assets)).scalar_one())

        files = [path for path in self.data_dir.joinpath("blobs").rglob("*") if path.is_file()]
        return self.portal.call(self.harness.server.db.read, count), len(files)

    @property
    def data_dir(self) -> Path:
        return Path(self.harness.app.state.data_dir)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("fuzz"))
    engine = GatedEngine()  # admitted jobs hold their slot: admission is exercised, nothing renders
    with start_blocking_portal() as portal:
        opened = open_harness(settings, engines={"procedural": engine.factory})
        with portal.wrap_async_context_manager(opened) as harness:
            harness.app.state.data_dir = settings.data_dir
            # replyUrls pass at a public address; no job ends, so none is ever sent
            harness.service.submissions.resolver = public_dns
            # room for every admitted example, so that valid bodies keep reaching the 200 path
            portal.call(harness.execute, update(accounts).values(max_jobs=1_000_000))
            yield Client(portal, harness)


@examples(max_examples=300)
@given(body=bodies)
def test_random_json_bodies_never_give_a_500(client: Client, body: dict[str, Any]) -> None:
    client.post(content=json.dumps(body), headers={"Content-Type": "application/json"})


@examples(max_examples=150)
@given(body=st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=30), max_size=8))
def test_random_multipart_forms_never_give_a_500(client: Client, body: dict[str, str]) -> None:
    client.post(data=body, files={"_": (None, "")})


@examples(max_examples=150)
@given(raw=st.binary(max_size=300), content_type=st.sampled_from(CONTENT_TYPES))
def test_random_bytes_never_give_a_500(client: Client, raw: bytes, content_type: str) -> None:
    client.post(content=raw, headers={"Content-Type": content_type})


def _picture(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((32, 32)).save(buffer, image_format)
    return buffer.getvalue()


PNG = _picture("PNG")
WEBP = _picture("WEBP")


@examples(max_examples=150)
@given(
    data=st.binary(max_size=2048)
    | st.builds(lambda cut: PNG[:cut], st.integers(0, len(PNG)))
    | st.builds(lambda cut: WEBP[:cut], st.integers(0, len(WEBP))),
    media=st.sampled_from(["image/png", "image/jpeg", "image/webp", "image/gif", "", "x/y"])
    | st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=20),
)
def test_random_uploads_never_give_a_500_nor_leave_a_file(
    client: Client, data: bytes, media: str
) -> None:
    before = client.stored()
    headers = {**client.harness.auth, "Content-Type": media}
    upload = partial(
        client.harness.client.post,
        "/v1/dreamina/assets/LOCAL:procedural",
        content=data,
        headers=headers,
    )
    reply = client.portal.call(upload)
    assert reply.status_code in (200, 400), reply.text
    rows, files = client.stored()
    if reply.status_code == 400:
        assert set(reply.json()) == {"error"}
        assert (rows, files) == before
    else:
        assert (rows, files) == (before[0] + 1, before[1] + 1)
