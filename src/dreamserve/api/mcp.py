"""The MCP server at /v1/dreamina/mcp: the API's operations as tools for AI assistants (the Model
Context Protocol over Streamable HTTP, with the official `mcp` SDK's low-level server).

Same token, same rules, same messages as the HTTP API:
- A request is authenticated as every route is (`authenticate`, before the SDK sees it): without
  a token or with a wrong one it is the API's own 401 `{"error": "Unauthorized"}`, raised to the
  app's error handlers.
- Each tool calls the service exactly as its route does, with the tool's arguments as the
  route's fields (JSON bodies and query strings are dicts of fields there too). The rules and
  messages live in the service (the routes are one-line adapters, and the import contracts keep
  it so), and an API error (a `DreamserveError`) becomes an MCP tool error (`isError`) whose
  text is the API's `error` as it is. The service rather than the routes called in-process
  (httpx's ASGITransport): a waiting `create_image` follows the job with the same
  `records.follow` the event stream uses (ASGITransport hands a streamed body over only once it
  ended, so progress could not be relayed); and an inner HTTP request would be counted and
  logged as a second request, authenticated again, and need its ids (`US:me@x.com`)
  percent-encoded into paths. tests/blackbox/test_mcp.py checks the messages are the API's.
- The argument schemas are the API's request models (`api/schemas.py`) and query parameters;
  they describe, the service validates, so a wrong value gets the API's message, not the SDK's.

Stateless Streamable HTTP: each POST is served on its own, with no session to find again, so
any of several API processes behind a proxy (docs/deploy.md) answers any request, with no
sticky routing; the tools never ask the client anything back (no sampling, no elicitation),
and the progress notifications of a call ride its own POST's event stream.

The SDK's DNS-rebinding protection (an allow-list of Host and Origin headers) is off: it guards
servers that trust whoever reaches them (a local server a hostile web page reaches through a
rebound DNS name), and every request here must carry the user's token, which such a page does
not have; the server runs behind proxies under any host name, which no fixed list would know.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import mcp.types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server as McpServer
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from dreamserve import __version__
from dreamserve.api.body import check_storable, read_body
from dreamserve.api.deps import USER, authenticate
from dreamserve.api.schemas import ImageJobRequest, UpscaleRequest
from dreamserve.assets import ACCEPTED, content_type_of, too_large
from dreamserve.errors import BadRequest, DreamserveError, InvalidParameter, Stopping
from dreamserve.service import Record, Service

log = logging.getLogger(__name__)

PATH = "/mcp"  # under the API's prefix: /v1/dreamina/mcp
NO_HOST_CHECKS = TransportSecuritySettings(enable_dns_rebinding_protection=False)
INSTRUCTIONS = (
    "dreamserve, a self-hosted Dreamina image API. create_image makes images from a prompt "
    "(and reference images: upload_asset, or the assetRef of an earlier image) and waits for "
    "them, reporting progress; the record it returns holds each image's imageUrl."
)


@dataclass(frozen=True)
class Call:
    """One tool call: the service, the user of the request's token, the arguments."""

    service: Service
    user: int
    arguments: dict[str, Any]
    context: ServerRequestContext[Any]


Run = Callable[[Call], Awaitable["dict[str, Any] | types.CallToolResult"]]


@dataclass(frozen=True)
class ToolSpec:
    tool: types.Tool
    run: Run


def _object(properties: Mapping[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": dict(properties)}
    if required:
        schema["required"] = list(required)
    return schema


def _model_schema(model: type[ImageJobRequest | UpscaleRequest]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("title", None)
    return schema


_WAIT = {
    "type": "boolean",
    "default": True,
    "description": "Wait for the job to end, with progress notifications (default); false: "
    "return the created job at once (then get_image)",
}
_IDEMPOTENCY_KEY = {
    "type": "string",
    "maxLength": 255,
    "description": "As the Idempotency-Key header: the same key and arguments within 24 hours "
    "return the job the first call made",
}
_JOBID = {"type": "string", "description": "The job's id (jobid of its record)"}
_ACCOUNT = {"type": "string", "description": "An account id, REGION:name (list_accounts)"}


def _image_schema() -> dict[str, Any]:
    schema = _model_schema(ImageJobRequest)
    schema["properties"] |= {"wait": _WAIT, "idempotencyKey": _IDEMPOTENCY_KEY}
    return schema


def _upscale_schema() -> dict[str, Any]:
    schema = _model_schema(UpscaleRequest)
    schema["properties"] |= {"wait": _WAIT, "idempotencyKey": _IDEMPOTENCY_KEY}
    return schema


def _fields(call: Call, *names: str) -> dict[str, Any]:
    """The arguments of a route's query string, as it gets them (strings), the others left."""
    return {
        name: value if isinstance(value, str) else json.dumps(value)
        for name, value in call.arguments.items()
        if name in names and value is not None
    }


def _text(call: Call, name: str) -> str:
    """A path parameter: given, a string (the route's 404 or 400 follows from the service)."""
    value = call.arguments.get(name)
    if value is None or value == "":
        raise BadRequest(f"Parameter {name} is required")
    if not isinstance(value, str):
        raise BadRequest(f"Parameter {name} must be a string")
    return value


def _without(arguments: Mapping[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in arguments.items() if key not in names}


async def _list_models(call: Call) -> dict[str, Any]:
    return call.service.submissions.catalogue_listing()


async def _create_image(call: Call) -> dict[str, Any] | types.CallToolResult:
    call.service.submissions.admitting()  # a stopping server: its 503, as POST /images
    fields = _without(call.arguments, "wait", "idempotencyKey")
    check_storable(fields)  # as the route refuses such a body: PostgreSQL text cannot hold it
    _waits(call)  # before the job is made
    record = await call.service.submissions.image(call.user, fields, _key(call))
    return await _finished(call, record)


async def _upscale_image(call: Call) -> dict[str, Any] | types.CallToolResult:
    call.service.submissions.admitting()
    fields = _without(call.arguments, "wait", "idempotencyKey")
    check_storable(fields)  # as the route refuses such a body: PostgreSQL text cannot hold it
    _waits(call)  # before the job is made
    record = await call.service.submissions.upscale(call.user, fields, _key(call))
    return await _finished(call, record)


def _waits(call: Call) -> bool:
    """The `wait` of create_image and upscale_image: a boolean, true when left out (`"false"`
    or `0` would otherwise wait, maybe for as long as the job queues)."""
    wait = call.arguments.get("wait", True)
    if not isinstance(wait, bool):
        raise InvalidParameter("wait", wait, "true, false")
    return wait


def _key(call: Call) -> str | None:
    """The Idempotency-Key header's value, given as an argument."""
    key = call.arguments.get("idempotencyKey")
    if key is not None and not isinstance(key, str):
        raise BadRequest("Parameter idempotencyKey must be a string")
    return key


async def _get_image(call: Call) -> dict[str, Any]:
    jobid = _text(call, "jobid")
    wait = _fields(call, "wait").get("wait")
    seconds = 0 if wait is None else call.service.records.wait_seconds(wait)
    return dict(await call.service.records.get(call.user, jobid, seconds))


async def _list_images(call: Call) -> dict[str, Any]:
    fields = _fields(call, "status", "model", "account", "since", "limit", "cursor")
    return dict(await call.service.records.page(call.user, fields))


async def _cancel_job(call: Call) -> dict[str, Any]:
    return dict(await call.service.scheduler.cancel(call.user, _text(call, "jobid")))


async def _get_scheduler(call: Call) -> dict[str, Any]:
    return dict(await call.service.scheduler.running(call.user))


async def _list_accounts(call: Call) -> dict[str, Any]:
    return dict(await call.service.accounts.listing(call.user))


async def _get_account(call: Call) -> dict[str, Any]:
    return dict(await call.service.accounts.get(call.user, _text(call, "account")))


async def _upload_asset(call: Call) -> dict[str, Any]:
    """POST /assets/<account>: the file's bytes as base64 (`data`) with its `contentType`."""
    service = call.service
    media = content_type_of(_fields(call, "contentType").get("contentType"))  # 5: its 400
    account = await service.accounts.usable(call.user, _text(call, "account"))
    data = call.arguments.get("data", "")
    if not isinstance(data, str):
        raise BadRequest("Parameter data must be the image file in base64")
    limit = service.config.max_upload_bytes
    if len(data) > (limit + 2) // 3 * 4 + 4:  # more characters than any image in the limit
        raise too_large(limit)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("Parameter data must be the image file in base64") from None
    if len(raw) > limit:
        raise too_large(limit)
    return dict(await service.assets.upload(call.user, account, media, io.BytesIO(raw)))


async def _list_assets(call: Call) -> dict[str, Any]:
    fields = _fields(call, "count", "offset")
    return dict(await call.service.assets.page(call.user, _text(call, "account"), fields))


async def _delete_asset(call: Call) -> dict[str, Any]:
    return dict(await call.service.assets.delete(call.user, _text(call, "assetId")))


async def _get_webhook_secret(call: Call) -> dict[str, Any]:
    return dict(await call.service.webhooks.secret(call.user))


async def _list_webhooks(call: Call) -> dict[str, Any]:
    return dict(await call.service.webhooks.deliveries(call.user, _text(call, "jobid")))


async def _redeliver_webhook(call: Call) -> dict[str, Any]:
    return dict(await call.service.webhooks.redeliver(call.user, _text(call, "jobid")))


async def _finished(call: Call, record: Record) -> dict[str, Any] | types.CallToolResult:
    """With `wait` (the default): the job followed until it ends, each change of its record a
    progress notification (0-100), and its final record; a failed job is a tool error whose
    text is the record's `error`. Without: the created job's record at once. A job still
    running when the server starts to stop is returned as it is (then get_image)."""
    if not _waits(call):
        return dict(record)
    last: Record = record
    reported = -1.0
    events = call.service.records.follow(call.user, record["jobid"])
    try:
        async for body in events:
            if body is None:  # a keep-alive: progress must grow, so nothing to say
                continue
            last = body
            done = body["status"] == "completed"
            value = 100.0 if done else float(body.get("progress") or 0)
            if value > reported and body["status"] != "failed":
                reported = value
                await call.context.session.report_progress(value, 100.0, _stage(body))
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    if last["status"] == "failed":
        return _failure(str(last.get("error", "failed")), dict(last))
    return dict(last)


def _stage(record: Record) -> str:
    if record["status"] == "completed":
        return "completed"
    position = record.get("queuePosition")
    return "running" if position is None else f"queued, position {position}"


def _reply(value: dict[str, Any]) -> types.CallToolResult:
    """A reply as the API's body: JSON text, the same as structured content, and a link to each
    image of a job record."""
    content: list[types.ContentBlock] = [
        types.TextContent(type="text", text=json.dumps(value, ensure_ascii=False))
    ]
    images = (value.get("response") or {}).get("images") if "jobid" in value else None
    for index, image in enumerate(images or []):
        content.append(
            types.ResourceLink(
                type="resource_link",
                uri=image["imageUrl"],
                name=f"image {index}",
                mime_type=f"image/{image.get('format', 'jpeg')}",
            )
        )
    return types.CallToolResult(content=content, structured_content=value)


def _failure(message: str, structured: dict[str, Any]) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=message)],
        structured_content=structured,
        is_error=True,
    )


def _error(error: DreamserveError) -> types.CallToolResult:
    """The API's error as a tool error: its message as the text, and its body (`error`) with
    the HTTP status it has in the API as structured content."""
    return _failure(error.message, {"error": error.message, "status": error.status})


READ_ONLY = types.ToolAnnotations(read_only_hint=True, open_world_hint=False)
CHANGES = types.ToolAnnotations(read_only_hint=False, destructive_hint=False)
DESTROYS = types.ToolAnnotations(read_only_hint=False, destructive_hint=True)


def _spec(
    name: str,
    description: str,
    schema: dict[str, Any],
    run: Run,
    annotations: types.ToolAnnotations,
) -> ToolSpec:
    tool = types.Tool(
        name=name, description=description, input_schema=schema, annotations=annotations
    )
    return ToolSpec(tool, run)


TOOLS = {
    spec.tool.name: spec
    for spec in (
        _spec(
            "list_models",
            "The model catalogue (GET /models): each model's ratios, resolutions, pixel sizes "
            "and how many reference images it takes.",
            _object({}),
            _list_models,
            READ_ONLY,
        ),
        _spec(
            "create_image",
            "Create an image job (POST /images) and, unless wait is false, wait for its images "
            "with progress notifications. The job record has each image's imageUrl (a signed "
            "link) and assetRef (usable as imageRef_N of a later job).",
            _image_schema(),
            _create_image,
            CHANGES,
        ),
        _spec(
            "get_image",
            "An image or upscale job's record (GET /images/<jobid>); with wait (seconds, at "
            "most 60), once it ends or when the time is up.",
            _object(
                {
                    "jobid": _JOBID,
                    "wait": {"type": "integer", "minimum": 0, "maximum": 60},
                },
                ("jobid",),
            ),
            _get_image,
            READ_ONLY,
        ),
        _spec(
            "list_images",
            "Your jobs, newest first (GET /images), with filters; `next` is the cursor of the "
            "following page.",
            _object(
                {
                    "status": {"type": "string", "enum": ["created", "completed", "failed"]},
                    "model": {"type": "string"},
                    "account": _ACCOUNT,
                    "since": {"type": "string", "format": "date-time"},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    "cursor": {"type": "string"},
                }
            ),
            _list_images,
            READ_ONLY,
        ),
        _spec(
            "upscale_image",
            "Upscale one image of a completed image job (POST /images/upscale) and, unless "
            "wait is false, wait for it with progress notifications.",
            _upscale_schema(),
            _upscale_image,
            CHANGES,
        ),
        _spec(
            "cancel_job",
            "Cancel a running or queued job (DELETE /scheduler/<jobid>): it ends failed, "
            "`Cancelled by user`.",
            _object({"jobid": _JOBID}, ("jobid",)),
            _cancel_job,
            DESTROYS,
        ),
        _spec(
            "get_scheduler",
            "Your unfinished jobs by account (GET /scheduler).",
            _object({}),
            _get_scheduler,
            READ_ONLY,
        ),
        _spec(
            "list_accounts",
            "The accounts you can use, your own and the shared ones (GET /accounts).",
            _object({}),
            _list_accounts,
            READ_ONLY,
        ),
        _spec(
            "get_account",
            "One account, with its live state (GET /accounts/<account>).",
            _object({"account": _ACCOUNT}, ("account",)),
            _get_account,
            READ_ONLY,
        ),
        _spec(
            "upload_asset",
            "Upload a reference image (POST /assets/<account>): the file in base64. Its "
            "assetRef is then usable as imageRef_N of create_image on that account.",
            _object(
                {
                    "account": _ACCOUNT,
                    "contentType": {"type": "string", "enum": list(ACCEPTED)},
                    "data": {"type": "string", "description": "The image file, base64"},
                },
                ("account", "contentType", "data"),
            ),
            _upload_asset,
            CHANGES,
        ),
        _spec(
            "list_assets",
            "An account's generated images, newest first (GET /assets/<account>).",
            _object(
                {
                    "account": _ACCOUNT,
                    "count": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    "offset": {"type": "integer", "minimum": 0, "default": 0},
                },
                ("account",),
            ),
            _list_assets,
            READ_ONLY,
        ),
        _spec(
            "delete_asset",
            "Delete an image (DELETE /assets/<assetId>).",
            _object(
                {"assetId": {"type": "string", "description": "<account>:<itemId>"}},
                ("assetId",),
            ),
            _delete_asset,
            DESTROYS,
        ),
        _spec(
            "get_webhook_secret",
            "The secret that signs your webhook deliveries (GET /webhooks/secret).",
            _object({}),
            _get_webhook_secret,
            READ_ONLY,
        ),
        _spec(
            "list_webhooks",
            "A job's webhook deliveries, with each try (GET /images/<jobid>/webhooks).",
            _object({"jobid": _JOBID}, ("jobid",)),
            _list_webhooks,
            READ_ONLY,
        ),
        _spec(
            "redeliver_webhook",
            "Send an ended job's record to its replyUrl again, now "
            "(POST /images/<jobid>/webhooks).",
            _object({"jobid": _JOBID}, ("jobid",)),
            _redeliver_webhook,
            CHANGES,
        ),
    )
}


async def _list_tools(
    _context: ServerRequestContext[Any], _params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    return types.ListToolsResult(tools=[spec.tool for spec in TOOLS.values()])


async def _call_tool(
    context: ServerRequestContext[Any], params: types.CallToolRequestParams
) -> types.CallToolResult:
    spec = TOOLS.get(params.name)
    if spec is None:
        return _failure(f"Unknown tool {params.name}", {"error": f"Unknown tool {params.name}"})
    request = context.request
    assert isinstance(request, Request)  # Streamable HTTP: the POST that carried the call
    service: Service = request.app.state.service
    call = Call(service, request.scope[USER], dict(params.arguments or {}), context)
    try:
        result = await spec.run(call)
    except DreamserveError as error:
        return _error(error)
    except Exception:  # as the API's 500: logged, and no detail to the client
        log.exception("MCP tool %s failed", params.name)
        return _failure("Internal server error", {"error": "Internal server error"})
    return result if isinstance(result, types.CallToolResult) else _reply(result)


class McpEndpoint:
    """The ASGI app of the MCP route: the token checked as the API checks it, then the SDK's
    stateless Streamable HTTP transport. `running()` (in the app's lifespan) starts the SDK's
    session manager, a new one for each start (a manager runs once)."""

    def __init__(self, max_body_bytes: int, retry_after: int) -> None:
        self.server: McpServer[Any] = McpServer(
            "dreamserve",
            version=__version__,
            instructions=INSTRUCTIONS,
            on_list_tools=_list_tools,
            on_call_tool=_call_tool,
        )
        self.max_body_bytes = max_body_bytes
        self.retry_after = retry_after
        # The SDK says at INFO what every stateless POST does ("Terminating session: None"):
        # a second access log. Its warnings and errors are kept.
        logging.getLogger("mcp").setLevel(logging.WARNING)
        self._manager: StreamableHTTPSessionManager | None = None
        self._route: Route | None = None

    def route(self, prefix: str) -> Route:
        """POST only: stateless, there is no session to `DELETE`, and a `GET` event stream would
        stay open with nothing ever sent on it; the protocol's answer to those is a 405."""
        self._route = Route(prefix + PATH, self, methods=["POST"], include_in_schema=False)
        return self._route

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        manager = StreamableHTTPSessionManager(
            self.server,
            stateless=True,
            security_settings=NO_HOST_CHECKS,
            max_request_body_size=self.max_body_bytes,
        )
        async with manager.run():
            self._manager = manager
            try:
                yield
            finally:
                self._manager = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # FastAPI's router names the matched route only for its own routes: named here, the
        # HTTP metrics count this one under its path, not as `unmatched`.
        scope["route"] = self._route
        request = Request(scope, receive)
        _, user = await authenticate(request)  # the API's 401, by its error handlers
        manager = self._manager
        if manager is None:  # not started, or stopped
            raise Stopping(self.retry_after)
        # Read as the API reads a JSON body: its size limit and 413, and its caps on the bodies
        # of a user (and of everyone) arriving at once. Then handed to the SDK as it came.
        body = await read_body(request, user, self.max_body_bytes)
        given = False

        async def replay() -> Message:
            nonlocal given
            if given:
                return await receive()  # the client's disconnect, while a stream is open
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        await manager.handle_request(scope, replay, _unbuffered(send))


def _unbuffered(send: Send) -> Send:
    """An event stream's responses say `X-Accel-Buffering: no`, as the API's own event stream
    does: nginx then relays each progress notification as it comes, not once its buffer
    fills (the SDK says so on its 2026-07-28 path only)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            names = {name.lower() for name, _ in headers}
            streams = any(
                name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                for name, value in headers
            )
            if streams and b"x-accel-buffering" not in names:
                message = {**message, "headers": [*headers, (b"x-accel-buffering", b"no")]}
        await send(message)

    return sending


def request_bytes(max_body_bytes: int, max_upload_bytes: int) -> int:
    """The largest MCP request: a JSON body as the API takes, or an upload_asset call with the
    largest upload in base64 (4 characters for 3 bytes), with room for the JSON-RPC around."""
    return max(max_body_bytes, (max_upload_bytes + 2) // 3 * 4 + 64 * 1024)
