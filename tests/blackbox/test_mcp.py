"""Black box: the MCP server at /v1/dreamina/mcp of a real `dreamserve serve`, through the `mcp`
SDK's own client (Streamable HTTP, `ClientSession`): the tools listed, an image job made and
waited on with progress notifications, a reference uploaded and used, a job cancelled, and the
API's errors as MCP tool errors carrying the API's own messages (compared with what the HTTP API
answers to the same request)."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, TextContent
from PIL import Image
from plugin_site import PluginSite
from servers import DREAMSERVE_SERVE, Server
from support import free_port

pytestmark = [pytest.mark.blackbox, pytest.mark.anyio]

API = "/v1/dreamina"
TOOLS = {
    "list_models",
    "create_image",
    "get_image",
    "list_images",
    "upscale_image",
    "cancel_job",
    "get_scheduler",
    "list_accounts",
    "get_account",
    "upload_asset",
    "list_assets",
    "delete_asset",
    "get_webhook_secret",
    "list_webhooks",
    "redeliver_webhook",
}
SMALL = {"prompt": "a lighthouse at dusk", "model": "nano-banana", "ratio": "1:1"}
MAX_UPLOAD = 1 << 20  # DREAMSERVE_MAX_UPLOAD_BYTES: an MCP request may hold its base64
HELD_MODEL = "seedream-3.0"  # the only model of the held engine's account
# A bound for waits on a loaded machine; never asserted as a duration.
WAIT_SECONDS = 120

# A plugin engine whose jobs run until they are cancelled: a job the test can cancel while it
# runs, whatever the machine's speed.
HELD_ENGINE = """
import asyncio


class HeldEngine:
    operator_only = False

    def __init__(self, settings, context):
        pass

    def serves(self, model):
        return True

    async def generate(self, request, progress, cancel):
        progress(0.25)
        while not cancel.is_set:
            await asyncio.sleep(0.02)
        cancel.raise_if_set()

    async def close(self):
        pass
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("mcp")
    with pytest.MonkeyPatch.context() as patch:
        site = PluginSite(root / "site", patch)
        site.install(
            "dreamserve-held", {"held": "held_engine:HeldEngine"}, {"held_engine": HELD_ENGINE}
        )
        path = os.pathsep.join([str(root / "site"), os.environ.get("PYTHONPATH", "")])
        env = {
            "DREAMSERVE_ACCESS_LOG": "false",
            "PYTHONPATH": path,
            "DREAMSERVE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        }
        running = Server(root / "data", free_port(), None, env, DREAMSERVE_SERVE)
        try:
            yield running
        finally:
            running.stop()
            site.forget()


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {server.token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as client:
        yield client


@asynccontextmanager
async def connected(server: Server, token: str | None) -> AsyncIterator[ClientSession]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    timeout = httpx2.Timeout(30, read=WAIT_SECONDS)
    async with (
        httpx2.AsyncClient(headers=headers, timeout=timeout) as client,
        streamable_http_client(f"{server.url}{API}/mcp", http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


@pytest.fixture
async def session(server: Server) -> AsyncIterator[ClientSession]:
    async with connected(server, server.token) as opened:
        yield opened


def body(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def error_text(result: CallToolResult) -> str:
    assert result.is_error, result
    [content] = result.content
    assert isinstance(content, TextContent)
    return content.text


def png() -> bytes:
    image = Image.new("RGB", (96, 64))
    image.putdata([(x * 2, y * 3, 120) for y in range(64) for x in range(96)])
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


async def test_the_tools_are_listed(session: ClientSession) -> None:
    listed = await session.list_tools()
    assert {tool.name for tool in listed.tools} == TOOLS
    create = next(tool for tool in listed.tools if tool.name == "create_image")
    assert {"prompt", "model", "ratio", "imageRef_1", "count", "wait"} <= set(
        create.input_schema["properties"]
    )


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}
ACCEPT = {"Accept": "application/json, text/event-stream"}


async def test_no_token_or_a_wrong_one_is_the_apis_401(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url) as bare:
        for headers in ({}, {"Authorization": "Bearer user:1-not-the-right-secret-at-all"}):
            reply = await bare.post(f"{API}/mcp", json=INITIALIZE, headers=ACCEPT | headers)
            assert (reply.status_code, reply.json()) == (401, {"error": "Unauthorized"})
    # The SDK's client refuses to go on: its initialize request failed.
    with pytest.raises(BaseExceptionGroup) as refused:
        async with connected(server, "user:1-not-the-right-secret-at-all"):
            pass
    assert refused.group_contains(MCPError)


async def test_the_event_stream_is_not_buffered_by_a_proxy(http: httpx.AsyncClient) -> None:
    reply = await http.post(f"{API}/mcp", json=INITIALIZE, headers=ACCEPT)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.headers["x-accel-buffering"] == "no"
    metrics = (await http.get("/metrics")).text
    assert 'route="/v1/dreamina/mcp"' in metrics


async def test_only_post_is_served_and_a_body_past_the_limit_is_the_apis_413(
    http: httpx.AsyncClient,
) -> None:
    for method in ("GET", "DELETE", "PUT"):
        reply = await http.request(method, f"{API}/mcp", headers=ACCEPT)
        assert reply.status_code == 405
        assert (reply.json(), reply.headers["allow"]) == ({"error": "Method Not Allowed"}, "POST")
    # The largest request: an upload's base64 and 64 KiB of room (api/mcp.py request_bytes).
    limit = (MAX_UPLOAD + 2) // 3 * 4 + 64 * 1024
    big = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "' + b"x" * limit
    reply = await http.post(f"{API}/mcp", content=big + b'"}}', headers=ACCEPT)
    assert reply.status_code == 413
    assert reply.json() == {"error": f"Request body too large (limit {limit} bytes)"}


async def test_create_image_waits_with_progress_and_get_image_returns_it(
    session: ClientSession, http: httpx.AsyncClient
) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def heard(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    result = await session.call_tool("create_image", SMALL | {"count": 4}, progress_callback=heard)
    record = body(result)
    assert record["status"] == "completed"
    images = record["response"]["images"]
    assert len(images) == 4
    async with httpx.AsyncClient() as bare:  # each a signed link, fetched without the token
        for image in images:
            served = await bare.get(image["imageUrl"])
            assert served.status_code == 200
            Image.open(io.BytesIO(served.content)).verify()
    links = [block.uri for block in result.content if block.type == "resource_link"]
    assert links == [image["imageUrl"] for image in images]

    assert progress, "no progress notification"
    values = [value for value, _, _ in progress]
    assert values == sorted(set(values))  # growing, never repeated
    assert progress[-1] == (100.0, 100.0, "completed")

    got = body(await session.call_tool("get_image", {"jobid": record["jobid"]}))
    assert (got["jobid"], got["status"]) == (record["jobid"], "completed")
    assert [i["assetRef"] for i in got["response"]["images"]] == [i["assetRef"] for i in images]
    same = (await http.get(f"{API}/images/{record['jobid']}")).json()
    assert same["request"] == got["request"]

    progress.clear()
    upscale = {"jobid": record["jobid"], "imageIndex": 1, "upscaleResolution": "2k"}
    upscaled = body(await session.call_tool("upscale_image", upscale, progress_callback=heard))
    assert (upscaled["type"], upscaled["status"]) == ("upscale", "completed")
    assert upscaled["request"] == {"jobid": record["jobid"], "imageIndex": 1, "resolution": "2k"}
    [image] = upscaled["response"]["images"]
    assert max(image["width"], image["height"]) == 2048
    assert progress[-1] == (100.0, 100.0, "completed")

    listed = body(await session.call_tool("list_images", {"limit": 5}))
    jobids = [job["jobid"] for job in listed["jobs"]]
    assert {record["jobid"], upscaled["jobid"]} <= set(jobids)


async def test_an_uploaded_png_is_a_reference(session: ClientSession) -> None:
    data = base64.b64encode(png()).decode()
    upload = {"account": "LOCAL:procedural", "contentType": "image/png", "data": data}
    uploaded = body(await session.call_tool("upload_asset", upload))
    assert (uploaded["width"], uploaded["height"]) == (96, 64)
    request = SMALL | {"count": 1, "imageRef_1": uploaded["assetRef"]}
    record = body(await session.call_tool("create_image", request))
    assert record["status"] == "completed"
    assert record["request"]["inputMode"] == "reference"
    assert record["request"]["imageRef_1"] == uploaded["assetRef"]


async def test_a_waiting_job_cancelled_is_a_tool_error(
    server: Server, session: ClientSession, http: httpx.AsyncClient
) -> None:
    # Serving one model that no other test asks for: the other tests' jobs never land on it.
    account = {"account": "LOCAL:held", "engine": "held", "models": [HELD_MODEL]}
    added = await http.post(f"{API}/accounts", json=account)
    assert added.status_code == 200, added.text
    accounts = body(await session.call_tool("list_accounts", {}))
    assert accounts == (await http.get(f"{API}/accounts")).json()
    request = SMALL | {"count": 1, "model": HELD_MODEL, "account": "LOCAL:held"}
    outcome: list[CallToolResult] = []

    async def generate() -> None:
        async with connected(server, server.token) as other:
            outcome.append(await other.call_tool("create_image", request))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(generate)
        with anyio.fail_after(WAIT_SECONDS):
            while True:
                running = body(await session.call_tool("get_scheduler", {}))
                held = running["executing"].get("LOCAL:held", [])
                if held:
                    break
                await anyio.sleep(0.1)
        cancelled = body(await session.call_tool("cancel_job", {"jobid": held[0]["jobid"]}))
        assert (cancelled["status"], cancelled["error"]) == ("failed", "Cancelled by user")
    [waited] = outcome
    assert error_text(waited) == "Cancelled by user"
    assert waited.structured_content is not None
    assert waited.structured_content["jobid"] == held[0]["jobid"]

    created = body(await session.call_tool("create_image", request | {"wait": False}))
    assert created["status"] == "created"
    again = body(await session.call_tool("cancel_job", {"jobid": created["jobid"]}))
    assert again["error"] == "Cancelled by user"


@pytest.mark.parametrize(
    ("tool", "arguments", "method", "path", "json"),
    [
        ("create_image", SMALL | {"model": "nope"}, "POST", "/images", SMALL | {"model": "nope"}),
        ("create_image", {"model": "nano-banana"}, "POST", "/images", {"model": "nano-banana"}),
        ("create_image", SMALL | {"count": 9}, "POST", "/images", SMALL | {"count": 9}),
        (
            "get_image",
            {"jobid": "j0101000000000000000i-u1-LOCAL:procedural-bot:dreamina"},
            "GET",
            "/images/j0101000000000000000i-u1-LOCAL:procedural-bot:dreamina",
            None,
        ),
        ("get_account", {"account": "US:nobody"}, "GET", "/accounts/US:nobody", None),
        ("upscale_image", {}, "POST", "/images/upscale", {}),
        ("list_images", {"limit": 500}, "GET", "/images?limit=500", None),
        ("cancel_job", {"jobid": "nope"}, "DELETE", "/scheduler/nope", None),
        # Text PostgreSQL cannot store: refused as the API refuses such a body.
        (
            "create_image",
            SMALL | {"prompt": "a\x00b"},
            "POST",
            "/images",
            SMALL | {"prompt": "a\x00b"},
        ),
        ("upscale_image", {"jobid": "j\x00"}, "POST", "/images/upscale", {"jobid": "j\x00"}),
    ],
)
async def test_api_errors_are_tool_errors_with_the_apis_message(
    session: ClientSession,
    http: httpx.AsyncClient,
    tool: str,
    arguments: dict[str, Any],
    method: str,
    path: str,
    json: dict[str, Any] | None,
) -> None:
    reply = await http.request(method, API + path, json=json)
    assert 400 <= reply.status_code < 500, reply.text
    result = await session.call_tool(tool, arguments)
    assert error_text(result) == reply.json()["error"]
    assert result.structured_content == {
        "error": reply.json()["error"],
        "status": reply.status_code,
    }


async def test_an_upload_of_a_wrong_type_is_the_apis_message(
    session: ClientSession, http: httpx.AsyncClient
) -> None:
    gif = {"Content-Type": "image/gif"}
    reply = await http.post(f"{API}/assets/LOCAL:procedural", content=b"GIF89a", headers=gif)
    assert reply.status_code == 400
    data = base64.b64encode(b"GIF89a").decode()
    upload = {"account": "LOCAL:procedural", "contentType": "image/gif", "data": data}
    assert error_text(await session.call_tool("upload_asset", upload)) == reply.json()["error"]
    for wrong, shown in ((5, "5"), (["image/png"], '["image/png"]')):  # not a 500
        upload = {"account": "LOCAL:procedural", "contentType": wrong, "data": data}
        assert error_text(await session.call_tool("upload_asset", upload)) == (
            f"Content-Type ({shown}) not supported. Valid values: image/jpeg, image/png, image/webp"
        )
    empty = await http.post(
        f"{API}/assets/LOCAL:procedural", content=b"", headers={"Content-Type": "image/png"}
    )
    upload = {"account": "LOCAL:procedural", "contentType": "image/png", "data": ""}
    assert error_text(await session.call_tool("upload_asset", upload)) == empty.json()["error"]
    large = b"\x89PNG" + bytes(MAX_UPLOAD)  # past the limit by 4 bytes
    reply = await http.post(
        f"{API}/assets/LOCAL:procedural", content=large, headers={"Content-Type": "image/png"}
    )
    assert reply.status_code == 400, reply.text
    data = base64.b64encode(large).decode()
    upload = {"account": "LOCAL:procedural", "contentType": "image/png", "data": data}
    assert error_text(await session.call_tool("upload_asset", upload)) == reply.json()["error"]


async def test_wait_is_a_boolean_checked_before_the_job_is_made(session: ClientSession) -> None:
    before = body(await session.call_tool("list_images", {"limit": 1}))["jobs"]
    for wrong, shown in (("false", "false"), (0, "0")):
        result = await session.call_tool("create_image", SMALL | {"count": 1, "wait": wrong})
        assert error_text(result) == f"Parameter wait ({shown}) valid values: true, false"
        upscale = {"jobid": "j0101000000000000000i-u1-LOCAL:procedural-bot:dreamina"}
        result = await session.call_tool("upscale_image", upscale | {"wait": wrong})
        assert error_text(result) == f"Parameter wait ({shown}) valid values: true, false"
    assert body(await session.call_tool("list_images", {"limit": 1}))["jobs"] == before


async def test_list_models_is_the_catalogue(
    session: ClientSession, http: httpx.AsyncClient
) -> None:
    models = (await http.get(f"{API}/models")).json()
    assert body(await session.call_tool("list_models", {})) == models


async def test_an_idempotency_key_returns_the_job_it_made(session: ClientSession) -> None:
    request = SMALL | {"count": 1, "wait": False, "idempotencyKey": "mcp-key-1"}
    first = body(await session.call_tool("create_image", request))
    again = body(await session.call_tool("create_image", request))
    assert again["jobid"] == first["jobid"]
    other = await session.call_tool("create_image", request | {"prompt": "something else"})
    assert error_text(other).startswith("Idempotency-Key")


async def test_the_2026_07_28_protocol_is_served_too(server: Server) -> None:
    """A client of the stateless protocol revision (no initialize handshake) gets the same
    tools, progress and errors."""
    headers = {"Authorization": f"Bearer {server.token}"}
    progress: list[float] = []

    async def heard(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with httpx2.AsyncClient(headers=headers, timeout=WAIT_SECONDS) as http:
        transport = streamable_http_client(f"{server.url}{API}/mcp", http_client=http)
        async with Client(transport, mode="2026-07-28") as client:
            assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
            request = SMALL | {"count": 1}
            result = await client.call_tool("create_image", request, progress_callback=heard)
            assert body(result)["status"] == "completed"
            assert progress[-1] == 100.0
            wrong = await client.call_tool("create_image", SMALL | {"ratio": "5:4"})
            assert error_text(wrong).startswith("Parameter ratio (5:4) valid values:")
