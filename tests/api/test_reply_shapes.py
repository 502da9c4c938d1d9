"""Every reply the running app sends matches the schema its OpenAPI document gives for that
route and status: the job record in each state, accounts, assets, the scheduler, webhooks and
errors. And the check bites: a reply that strays from its schema is refused.

The document stays open to new keys (the contract lets replies grow), but the server's own
replies must name every key they send there: the check reads each object schema with
properties as closed (`additionalProperties: false`).
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator, ValidationError
from PIL import Image
from receiver import receiving
from sqlalchemy import update
from support import (
    SMALL,
    CancellableEngine,
    FailingEngine,
    GatedEngine,
    Harness,
    open_harness,
    public_dns,
    wait_started,
)

from dreamserve.errors import JobFailed
from dreamserve.settings import Settings
from dreamserve.storage.tables import accounts

pytestmark = pytest.mark.anyio

API = "/v1/dreamina"
ACCOUNT = "LOCAL:procedural"


class Shapes:
    """Checks replies against the app's own OpenAPI document, each object read as closed."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.paths: dict[str, Any] = document["paths"]
        self.components = closed(document["components"])
        self.routes = [
            (re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$"), path)
            for path in self.paths
        ]

    def check(self, reply: httpx.Response) -> Any:
        """The reply's JSON body, once it matched the schema of its route and status
        (jsonschema's ValidationError otherwise)."""
        method = reply.request.method.lower()
        path = self.template(method, reply.request.url.raw_path.decode().partition("?")[0])
        responses = self.paths[path][method]["responses"]
        assert str(reply.status_code) in responses, f"{method} {path}: {reply.status_code}"
        schema = responses[str(reply.status_code)]["content"]["application/json"]["schema"]
        body = reply.json()
        self.validate(schema, body)
        return body

    def check_component(self, name: str, body: Any) -> Any:
        """`body` once it matched the document's component `name` (a webhook's body, an
        event's data)."""
        self.validate({"$ref": f"#/components/schemas/{name}"}, body)
        return body

    def validate(self, schema: dict[str, Any], body: Any) -> None:
        Draft202012Validator({**closed(schema), "components": self.components}).validate(body)

    def template(self, method: str, path: str) -> str:
        """The document's path for a request path: the match with the fewest parameters
        (/images/upscale before /images/{jobid})."""
        found = [
            template
            for pattern, template in self.routes
            if pattern.match(path) and method in self.paths[template]
        ]
        assert found, f"{method} {path} is not in the document"
        return min(found, key=lambda template: template.count("{"))


def closed(schema: Any) -> Any:
    """A copy of `schema` where every object schema with properties allows no other key."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    copied = {key: closed(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        copied["additionalProperties"] = False
    return copied


@pytest.fixture
def shapes(harness: Harness) -> Shapes:
    return Shapes(harness.app.openapi())


def png(width: int = 64, height: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(out, format="PNG")
    return out.getvalue()


# The job record


async def test_image_records_match_the_document_as_they_progress(
    settings: Settings,
) -> None:
    engine = GatedEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        shapes = Shapes(harness.app.openapi())
        created = shapes.check(await harness.post(SMALL))
        assert created["status"] == "created"
        jobid = created["jobid"]
        await wait_started(engine, 1)
        started = shapes.check(await harness.get(jobid))
        assert {"started", "progress"} <= set(started)
        engine.gate.set()
        await harness.wait(jobid)
        completed = shapes.check(await harness.get(jobid))
        assert completed["status"] == "completed"
        assert "updated" in completed
        assert completed["response"]["images"]
        wait = f"{API}/images/{jobid}?wait=1"
        assert shapes.check(await harness.client.get(wait, headers=harness.auth)) == completed


async def test_upscale_records_and_events_match_the_document(
    harness: Harness, shapes: Shapes
) -> None:
    jobid = (await harness.post(SMALL)).json()["jobid"]
    await harness.wait(jobid)
    stream = await harness.client.get(f"{API}/images/{jobid}/events", headers=harness.auth)
    [data] = [line[5:] for line in stream.text.splitlines() if line.startswith("data:")]
    assert shapes.check_component("JobRecord", json.loads(data))["status"] == "completed"
    body = {"jobid": jobid, "upscaleResolution": "2k"}
    upscale = shapes.check(await harness.call("POST", "/images/upscale", body))
    assert upscale["type"] == "upscale"
    await harness.wait(upscale["jobid"])
    upscaled = shapes.check(await harness.get(upscale["jobid"]))
    assert (upscaled["status"], len(upscaled["response"]["images"])) == ("completed", 1)


async def test_a_failed_record_matches_the_document(settings: Settings) -> None:
    engine = FailingEngine(JobFailed("The engine gave up", "out of ideas"))
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        shapes = Shapes(harness.app.openapi())
        jobid = shapes.check(await harness.post(SMALL))["jobid"]
        await harness.wait(jobid)
        failed = shapes.check(await harness.get(jobid))
        assert (failed["status"], failed["error"], failed["errorDetails"]) == (
            "failed",
            "The engine gave up",
            "out of ideas",
        )


# The scheduler: the listing, and the record of a cancelled job


async def test_the_scheduler_and_a_cancelled_record_match_the_document(
    settings: Settings,
) -> None:
    engine = CancellableEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        harness.service.submissions.resolver = public_dns  # the jobs are cancelled, not sent
        shapes = Shapes(harness.app.openapi())
        assert shapes.check(await harness.call("GET", "/scheduler")) == {
            "executing": {},
            "total": 0,
        }
        first = shapes.check(await harness.post(SMALL))["jobid"]
        hook = {**SMALL, "replyUrl": "https://example.com/hook", "replyRef": "r"}
        second = shapes.check(await harness.post(hook))["jobid"]
        await wait_started(engine, 2)
        listing = shapes.check(await harness.call("GET", "/scheduler"))
        assert [entry.get("replyUrl") for entry in listing["executing"][ACCOUNT]] == [
            None,
            "https://example.com/hook",
        ]
        for jobid in (first, second):
            cancelled = shapes.check(await harness.call("DELETE", f"/scheduler/{jobid}"))
            assert (cancelled["status"], cancelled["error"]) == ("failed", "Cancelled by user")


# Accounts


async def test_account_replies_match_the_document(harness: Harness, shapes: Shapes) -> None:
    own = {"account": "US:me@example.com", "engine": "procedural", "maxJobs": 2}
    saved = shapes.check(await harness.call("POST", "/accounts", own))
    assert saved["account"] == "US:me@example.com"
    await harness.execute(update(accounts).where(accounts.c.name == ACCOUNT).values(error="down"))
    listing = shapes.check(await harness.call("GET", "/accounts"))
    assert set(listing) == {ACCOUNT, "US:me@example.com"}
    assert listing[ACCOUNT]["error"] == "down"
    one = shapes.check(await harness.call("GET", f"/accounts/{ACCOUNT}"))
    assert "details" in one
    deleted = shapes.check(await harness.call("DELETE", "/accounts/US:me@example.com"))
    assert deleted == {"account": "US:me@example.com", "deleted": True, "remaining": 1}


# Assets


async def test_asset_replies_match_the_document(harness: Harness, shapes: Shapes) -> None:
    headers = {**harness.auth, "Content-Type": "image/png"}
    uploaded = await harness.client.post(f"{API}/assets/{ACCOUNT}", content=png(), headers=headers)
    assert shapes.check(uploaded)["account"] == ACCOUNT
    jobid = (await harness.post({**SMALL, "count": 2})).json()["jobid"]
    await harness.wait(jobid)
    first = shapes.check(await harness.call("GET", f"/assets/{ACCOUNT}?count=1"))
    assert (len(first["assets"]), first["hasMore"], first["nextOffset"]) == (1, True, 1)
    rest = shapes.check(await harness.call("GET", f"/assets/{ACCOUNT}?count=10&offset=1"))
    assert (len(rest["assets"]), rest["hasMore"], rest["nextOffset"]) == (1, False, None)
    asset_id = first["assets"][0]["assetId"]
    deleted = shapes.check(await harness.call("DELETE", f"/assets/{asset_id}"))
    assert deleted == {"deleted": True, "assetId": asset_id, "account": ACCOUNT}


# Webhooks


async def test_webhook_replies_and_deliveries_match_the_document(settings: Settings) -> None:
    private = settings.model_copy(update={"webhook_allow_private": True})
    async with open_harness(private) as harness:
        shapes = Shapes(harness.app.openapi())
        secret = shapes.check(await harness.call("GET", "/webhooks/secret"))
        assert set(secret) == {"secret"}
        rotated = shapes.check(await harness.call("POST", "/webhooks/secret"))
        assert "previousSecretExpires" in rotated
        with receiving() as receiver:
            body = {**SMALL, "replyUrl": f"{receiver.url}/hook", "replyRef": "ref-1"}
            jobid = (await harness.post(body)).json()["jobid"]
            await harness.wait(jobid)
            deliveries = await _delivered(harness, jobid)
            shapes.check(deliveries)
            redelivered = shapes.check(await harness.call("POST", f"/images/{jobid}/webhooks"))
            assert len(redelivered["deliveries"]) == 2
            shapes.check_component("JobRecord", receiver.received[0].json)


async def _delivered(harness: Harness, jobid: str) -> httpx.Response:
    """GET /images/<jobid>/webhooks once its delivery has a try."""
    for _ in range(500):
        reply = await harness.call("GET", f"/images/{jobid}/webhooks")
        found = reply.json()["deliveries"]
        if found and found[0]["tries"]:
            return reply
        await harness.server.deliverer.drain()
        await asyncio.sleep(0.01)
    raise AssertionError(f"no try of the delivery of {jobid}")


# Errors


async def test_error_replies_match_the_document(harness: Harness, shapes: Shapes) -> None:
    replies = [
        await harness.get("j0302140530123456789i-u1-LOCAL:procedural-bot:dreamina"),
        await harness.post({**SMALL, "model": "nope"}),
        await harness.call("GET", "/accounts", token="user:1-" + "x" * 30),
        await harness.call("DELETE", f"/accounts/{ACCOUNT}"),
    ]
    assert [reply.status_code for reply in replies] == [404, 400, 401, 403]
    for reply in replies:
        assert set(shapes.check(reply)) == {"error"}


# The check itself


def _extra_key(record: dict[str, Any]) -> None:
    record["colour"] = "red"


def _extra_image_key(record: dict[str, Any]) -> None:
    record["response"]["images"][0]["thumbnailUrl"] = "https://example.com/t.png"


def _code_as_text(record: dict[str, Any]) -> None:
    record["code"] = "200"


def _width_as_text(record: dict[str, Any]) -> None:
    record["response"]["images"][0]["width"] = "1024"


def _unknown_status(record: dict[str, Any]) -> None:
    record["status"] = "running"


def _unknown_format(record: dict[str, Any]) -> None:
    record["response"]["images"][0]["format"] = "gif"


def _null_where_a_key_is_left_out(record: dict[str, Any]) -> None:
    record["error"] = None


def _missing_key(record: dict[str, Any]) -> None:
    del record["response"]


def _images_as_null(record: dict[str, Any]) -> None:
    record["response"]["images"] = None


STRAYS: list[Callable[[dict[str, Any]], None]] = [
    _extra_key,
    _extra_image_key,
    _code_as_text,
    _width_as_text,
    _unknown_status,
    _unknown_format,
    _null_where_a_key_is_left_out,
    _missing_key,
    _images_as_null,
]


async def test_a_record_that_strays_from_its_schema_is_refused(
    harness: Harness, shapes: Shapes
) -> None:
    jobid = (await harness.post(SMALL)).json()["jobid"]
    await harness.wait(jobid)
    reply = await harness.get(jobid)
    shapes.check(reply)  # as sent, it passes
    let_through = []
    for stray in STRAYS:
        record = copy.deepcopy(reply.json())
        stray(record)
        try:
            shapes.check_component("JobRecord", record)
        except ValidationError:
            continue
        let_through.append(stray.__name__)
    assert let_through == []


async def test_a_reply_that_strays_from_its_route_schema_is_refused(
    harness: Harness, shapes: Shapes
) -> None:
    """Through `check`, as the tests above use it: the route's own schema, closed."""
    reply = await harness.call("GET", "/scheduler")
    strayed = httpx.Response(200, json={**reply.json(), "waiting": {}}, request=reply.request)
    with pytest.raises(ValidationError, match="'waiting' was unexpected"):
        shapes.check(strayed)
    listing = await harness.call("GET", "/accounts")
    summary = listing.json()[ACCOUNT]
    mistyped = {ACCOUNT: {**summary, "maxJobs": str(summary["maxJobs"])}}
    with pytest.raises(ValidationError, match="is not of type 'integer'"):
        shapes.check(httpx.Response(200, json=mistyped, request=listing.request))
