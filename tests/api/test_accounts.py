"""The accounts API: upsert, list, get, delete; shared accounts; secrets; isolation; health."""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Connection, select, update
from support import (
    SMALL,
    CancellableEngine,
    FakeClock,
    Harness,
    eventually,
    open_harness,
    wait_started,
)

from dreamserve.engines.base import CancelSignal, EngineContext, EngineSettings, GenerationRequest
from dreamserve.engines.procedural import ProceduralEngine
from dreamserve.engines.registry import BUILTIN
from dreamserve.errors import AccountError, BadRequest
from dreamserve.settings import Settings
from dreamserve.storage.tables import accounts

BUILTIN_NAMES = "procedural, diffusers, ark, gemini, openai"  # in the registry's order

pytestmark = pytest.mark.anyio

# The catalogue in its order; a US account serves all but the CA-only models.
ALL_MODELS = [
    *("seedream-5.0-lite", "seedream-4.7", "seedream-4.6", "seedream-4.5", "seedream-4.1"),
    *("seedream-4.0", "nano-banana", "seedream-3.0", "gpt-image-2"),
]
US_MODELS = [name for name in ALL_MODELS if name not in ("seedream-4.7", "gpt-image-2")]
STUDIO = {"account": "US:studio@example.com", "engine": "procedural", "maxJobs": 3}
KEY = "sk-live-0123456789abcdef"


class KeyedEngine(ProceduralEngine):
    """An upstream-like engine: needs an API key, refuses a wrong one as an account error."""

    seen_keys: list[str] = []  # noqa: RUF012 (the test reads what the engine was given)

    class Settings(EngineSettings):
        apiKey: SecretStr
        baseUrl: str = "https://upstream.example/v1"

    def __init__(self, settings: Mapping[str, Any], context: EngineContext) -> None:
        super().__init__(settings, context)
        self.key = str(settings["apiKey"])

    async def generate(
        self, request: GenerationRequest, progress: Any, cancel: CancelSignal
    ) -> list[Any]:
        KeyedEngine.seen_keys.append(self.key)
        if self.key != KEY:
            raise AccountError("Upstream refused the API key", "401 Unauthorized")
        return await super().generate(request, progress, cancel)


ENGINES = {**BUILTIN, "keyed": KeyedEngine}


def summary(**overrides: Any) -> dict[str, Any]:
    body = {
        "account": "US:studio@example.com",
        "email": "studio@example.com",
        "region": "US",
        "maxJobs": 3,
        "priority": 0,
        "engine": "procedural",
        "models": {"image": US_MODELS},
        "settings": {},
        "shared": False,
        "running": 0,
        "lastHour": {"completed": 0, "failed": 0},
    }
    return {**body, **overrides}


# POST /accounts


async def test_post_creates_an_account_and_replies_with_its_summary(harness: Harness) -> None:
    reply = await harness.call("POST", "/accounts", STUDIO)
    assert reply.status_code == 200
    assert reply.json() == summary()


async def test_the_account_id_defaults_to_region_and_email(harness: Harness) -> None:
    body = {"email": "a@b.co", "region": "EU", "engine": "procedural"}
    created = await harness.put_account(body)
    assert created == summary(account="EU:a@b.co", email="a@b.co", region="EU", maxJobs=10)
    created = await harness.put_account({"email": "c@d.co", "engine": "procedural"})
    assert (created["account"], created["region"]) == ("US:c@d.co", "US")


@pytest.mark.both_databases
async def test_the_same_new_account_posted_twice_at_once_is_saved_once(harness: Harness) -> None:
    replies = await asyncio.gather(*(harness.call("POST", "/accounts", STUDIO) for _ in range(6)))
    assert [reply.status_code for reply in replies] == [200] * 6
    assert sorted((await harness.call("GET", "/accounts")).json()) == [
        "LOCAL:procedural",
        "US:studio@example.com",
    ]


@pytest.mark.both_databases
async def test_post_again_replaces_the_account(harness: Harness) -> None:
    await harness.put_account(STUDIO)
    replaced = await harness.put_account({**STUDIO, "maxJobs": 7, "models": ["seedream-4.0"]})
    assert replaced == summary(maxJobs=7, models={"image": ["seedream-4.0"]})
    listed = (await harness.call("GET", "/accounts")).json()
    assert listed["US:studio@example.com"] == replaced


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"email": "me@example.com", "password": "hunter2"},
            f"Parameter engine is required, valid values: {BUILTIN_NAMES}",
        ),
        (
            {**STUDIO, "engine": "nope"},
            f"Parameter engine (nope) valid values: {BUILTIN_NAMES}",
        ),
        ({**STUDIO, "maxJobs": 0}, "Parameter maxJobs (0) valid values: integer 1-50"),
        ({**STUDIO, "maxJobs": 51}, "Parameter maxJobs (51) valid values: integer 1-50"),
        ({**STUDIO, "maxJobs": "many"}, "Parameter maxJobs (many) valid values: integer 1-50"),
        (
            {**STUDIO, "priority": 1001},
            "Parameter priority (1001) valid values: integer -1000-1000",
        ),
        (
            {**STUDIO, "priority": 1.5},
            "Parameter priority (1.5) valid values: integer -1000-1000",
        ),
        (
            {**STUDIO, "models": ["seedream-9"]},
            "Parameter models (seedream-9) valid values: " + ", ".join(ALL_MODELS),
        ),
        (
            {**STUDIO, "models": []},
            "Parameter models ([]) valid values: a list of catalogue models: "
            + ", ".join(ALL_MODELS),
        ),
        ({**STUDIO, "settings": "x"}, "Parameter settings must be an object"),
        (
            {**STUDIO, "settings": {"colour": "red"}},
            "Parameter settings.colour not allowed: engine procedural takes no settings",
        ),
        (
            {**STUDIO, "account": "no colon"},
            "Parameter account (no colon) valid values: an account id REGION:name "
            "(letters, digits or _ before the colon; no spaces or /)",
        ),
        (
            {**STUDIO, "region": "EU"},
            "Parameter region (EU) valid values: US, the region of account US:studio@example.com",
        ),
        ({"engine": "procedural"}, "Parameter account or email is required"),
    ],
)
async def test_a_bad_account_body_is_400_naming_the_parameter(
    harness: Harness, body: dict[str, Any], message: str
) -> None:
    reply = await harness.call("POST", "/accounts", body)
    assert reply.status_code == 400
    assert reply.json() == {"error": message}
    assert list((await harness.call("GET", "/accounts")).json()) == ["LOCAL:procedural"]


async def test_models_an_engine_cannot_serve_are_400(settings: Settings) -> None:
    class OnlyOne(ProceduralEngine):
        def serves(self, model: Any) -> bool:
            return bool(model.name == "seedream-4.0")

        can_run = serves  # not the procedural engine's "any model an account lists"

    async with open_harness(settings, engines={**BUILTIN, "one": OnlyOne}) as harness:
        body = {**STUDIO, "engine": "one", "models": ["seedream-4.0", "nano-banana"]}
        reply = await harness.call("POST", "/accounts", body)
        assert reply.status_code == 400
        assert reply.json() == {
            "error": "Parameter models (nano-banana) valid values: seedream-4.0 "
            "(what engine one serves)"
        }
        created = await harness.put_account({**STUDIO, "engine": "one"})
        assert created["models"] == {"image": ["seedream-4.0"]}


# GET /accounts and GET /accounts/<account>


async def test_list_has_own_and_shared_accounts_keyed_by_id(harness: Harness) -> None:
    await harness.put_account(STUDIO)
    listed = (await harness.call("GET", "/accounts")).json()
    assert listed == {
        "LOCAL:procedural": {
            "account": "LOCAL:procedural",
            "email": "procedural",
            "region": "LOCAL",
            "maxJobs": 10,
            "priority": 0,
            "engine": "procedural",
            "models": {"image": ALL_MODELS},
            "settings": {},
            "shared": True,
            "running": 0,
            "lastHour": {"completed": 0, "failed": 0},
        },
        "US:studio@example.com": summary(),
    }


@pytest.mark.parametrize(
    "path", ["US:studio@example.com", "US%3Astudio%40example.com", "US%253Astudio%2540example.com"]
)
async def test_get_one_accepts_the_id_raw_or_percent_encoded(harness: Harness, path: str) -> None:
    await harness.put_account(STUDIO)
    reply = await harness.call("GET", f"/accounts/{path}")
    assert reply.status_code == 200
    assert {**reply.json(), "details": None} == {**summary(), "details": None}


async def test_get_one_shows_what_the_engine_says_of_itself(harness: Harness) -> None:
    reply = await harness.call("GET", "/accounts/LOCAL:procedural")
    assert reply.json()["details"] == {
        "kind": "procedural",
        "note": "dreamserve procedural engine: an abstract composition, not a model's output",
    }
    assert "details" not in (await harness.call("GET", "/accounts")).json()["LOCAL:procedural"]


async def test_an_unknown_account_is_404(harness: Harness) -> None:
    for method in ("GET", "DELETE"):
        reply = await harness.call(method, "/accounts/US:ghost@example.com")
        assert reply.status_code == 404
        assert reply.json() == {
            "error": "Unable to find configuration for account US:ghost@example.com"
        }


async def test_running_shows_the_slots_taken(harness: Harness) -> None:
    await harness.put_account(STUDIO)
    await harness.execute(update(accounts).where(accounts.c.owner == 1).values(running=2))
    reply = await harness.call("GET", "/accounts/US:studio@example.com")
    assert reply.json()["running"] == 2


# DELETE /accounts/<account>


async def test_delete_replies_with_the_remaining_count(harness: Harness) -> None:
    await harness.put_account(STUDIO)
    await harness.put_account({**STUDIO, "account": "US:other@example.com"})
    reply = await harness.call("DELETE", "/accounts/US%3Astudio%40example.com")
    assert reply.status_code == 200
    assert reply.json() == {"account": "US:studio@example.com", "deleted": True, "remaining": 2}
    assert (await harness.call("GET", "/accounts/US:studio@example.com")).status_code == 404
    assert sorted((await harness.call("GET", "/accounts")).json()) == [
        "LOCAL:procedural",
        "US:other@example.com",
    ]


@pytest.mark.both_databases
async def test_deleting_an_account_cancels_its_running_jobs(settings: Settings) -> None:
    engine = CancellableEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        await harness.put_account(STUDIO)
        posted = await harness.post({**SMALL, "account": STUDIO["account"]})
        jobid = posted.json()["jobid"]
        await wait_started(engine, 1)
        reply = await harness.call("DELETE", f"/accounts/{STUDIO['account']}")
        assert reply.json()["deleted"] is True
        record = await harness.wait(jobid)
        assert (record["status"], record["error"], record["errorDetails"]) == (
            "failed",
            "Cancelled by user",
            "Account US:studio@example.com was deleted",
        )
        await eventually(lambda: engine.cancelled == 1)
        assert await harness.slots() == {"LOCAL:procedural": 0}


# Shared accounts


@pytest.mark.parametrize("method", ["POST", "DELETE"])
async def test_a_shared_account_cannot_be_changed_through_the_api(
    harness: Harness, method: str
) -> None:
    body = {"account": "LOCAL:procedural", "engine": "procedural", "maxJobs": 50}
    path = "/accounts" if method == "POST" else "/accounts/LOCAL:procedural"
    reply = await harness.call(method, path, body if method == "POST" else None)
    assert reply.status_code == 403
    assert reply.json() == {
        "error": "Account LOCAL:procedural is shared and managed by the operator"
    }
    assert (await harness.call("GET", "/accounts/LOCAL:procedural")).json()["maxJobs"] == 10


async def test_the_operator_manages_shared_accounts_through_the_service(harness: Harness) -> None:
    shared = await harness.service.accounts.put(None, {**STUDIO, "account": "LOCAL:gpu0"})
    assert shared["shared"] is True
    other = await harness.new_user()
    listed = (await harness.call("GET", "/accounts", token=other)).json()
    assert sorted(listed) == ["LOCAL:gpu0", "LOCAL:procedural"]
    posted = await harness.post({**SMALL, "account": "LOCAL:gpu0"}, token=other)
    assert posted.status_code == 200
    removed = await harness.service.accounts.delete(None, "LOCAL:gpu0")
    assert removed == {"account": "LOCAL:gpu0", "deleted": True, "remaining": 1}


async def test_a_user_account_named_like_a_shared_one_is_refused_to_the_operator(
    harness: Harness,
) -> None:
    await harness.put_account(STUDIO)
    with pytest.raises(BadRequest, match=r"^Account US:studio@example.com already exists as an"):
        await harness.service.accounts.put(None, STUDIO)


# Isolation: another user's account is answered as if it did not exist


async def test_another_users_account_is_invisible_and_unusable(harness: Harness) -> None:
    await harness.put_account(STUDIO)
    other = await harness.new_user()
    assert list((await harness.call("GET", "/accounts", token=other)).json()) == [
        "LOCAL:procedural"
    ]
    not_found = {"error": "Unable to find configuration for account US:studio@example.com"}
    for method in ("GET", "DELETE"):
        reply = await harness.call(method, "/accounts/US:studio@example.com", token=other)
        assert (reply.status_code, reply.json()) == (404, not_found)
    reply = await harness.post({**SMALL, "account": "US:studio@example.com"}, token=other)
    assert (reply.status_code, reply.json()) == (404, not_found)
    assert (await harness.call("GET", "/accounts/US:studio@example.com")).status_code == 200


@pytest.mark.both_databases
async def test_two_users_may_have_accounts_of_the_same_id(harness: Harness) -> None:
    await harness.put_account(STUDIO)
    other = await harness.new_user()
    await harness.put_account({**STUDIO, "maxJobs": 9}, token=other)
    mine = (await harness.call("GET", "/accounts/US:studio@example.com")).json()
    theirs = (await harness.call("GET", "/accounts/US:studio@example.com", token=other)).json()
    assert (mine["maxJobs"], theirs["maxJobs"]) == (3, 9)


# Secrets


@pytest.fixture
async def keyed(settings: Settings):
    KeyedEngine.seen_keys = []
    async with open_harness(settings, engines=ENGINES) as harness:
        yield harness


async def test_a_missing_api_key_is_400_naming_it(keyed: Harness) -> None:
    reply = await keyed.call("POST", "/accounts", {**STUDIO, "engine": "keyed"})
    assert reply.status_code == 400
    assert reply.json() == {"error": "Parameter settings.apiKey is required"}


@pytest.mark.both_databases
async def test_secrets_are_never_returned_and_stored_encrypted(
    keyed: Harness, settings: Settings
) -> None:
    body = {**STUDIO, "engine": "keyed", "settings": {"apiKey": KEY, "baseUrl": "http://u/v1"}}
    created = await keyed.put_account(body)
    assert created["settings"] == {"baseUrl": "http://u/v1"}
    for path in ("/accounts", "/accounts/US:studio@example.com"):
        assert KEY not in (await keyed.call("GET", path)).text
    assert KEY not in str(created)

    def stored(conn: Connection) -> list[Any]:
        return list(conn.execute(select(accounts)).all())

    rows = await keyed.server.db.read(stored)
    assert KEY not in repr(rows)
    key_file = settings.data_dir / "secrets.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


async def test_the_engine_gets_the_key_and_logs_never_show_it(
    keyed: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await keyed.put_account({**STUDIO, "engine": "keyed", "settings": {"apiKey": KEY}})
    posted = await keyed.post({**SMALL, "account": STUDIO["account"]})
    assert (await keyed.wait(posted.json()["jobid"]))["status"] == "completed"
    assert KeyedEngine.seen_keys == [KEY]
    assert KEY not in caplog.text


# Account health


async def test_an_account_error_puts_the_account_in_error_until_saved_again(
    keyed: Harness,
) -> None:
    wrong = {**STUDIO, "engine": "keyed", "settings": {"apiKey": "sk-wrong"}}
    await keyed.put_account(wrong)
    posted = await keyed.post({**SMALL, "account": STUDIO["account"]})
    record = await keyed.wait(posted.json()["jobid"])
    assert (record["status"], record["error"], record["errorDetails"]) == (
        "failed",
        "Upstream refused the API key",
        "401 Unauthorized",
    )
    shown = (await keyed.call("GET", "/accounts/US:studio@example.com")).json()
    assert (shown["error"], shown["running"]) == ("Upstream refused the API key", 0)
    again = await keyed.post({**SMALL, "account": STUDIO["account"]})
    assert (again.status_code, again.json()) == (
        400,
        {"error": "Account US:studio@example.com is in error: Upstream refused the API key"},
    )
    fixed = await keyed.put_account({**wrong, "settings": {"apiKey": KEY}})
    assert "error" not in fixed
    posted = await keyed.post({**SMALL, "account": STUDIO["account"]})
    assert (await keyed.wait(posted.json()["jobid"]))["status"] == "completed"


# Found in review: odd ids, stale engines, races


@pytest.mark.parametrize("path", ["%00", "US:a%00b", "US:a%2500b", "US:a%E2%80%A8b", "US:a%C2%A0b"])
async def test_a_path_that_cannot_be_an_account_id_is_404(harness: Harness, path: str) -> None:
    for method in ("GET", "DELETE"):
        reply = await harness.call(method, f"/accounts/{path}")
        assert reply.status_code == 404
        assert reply.json()["error"].startswith("Unable to find configuration for account")


async def test_a_region_is_letters_digits_or_underscore(harness: Harness) -> None:
    for region in ("EU:x", "E U"):
        reply = await harness.call(
            "POST", "/accounts", {"email": "a@b.co", "region": region, "engine": "procedural"}
        )
        assert (reply.status_code, reply.json()) == (
            400,
            {
                "error": f"Parameter region ({region}) valid values: letters, digits or _ "
                "(at most 32)"
            },
        )


@pytest.mark.parametrize(
    "body",
    [
        b'{"account": "US:a@b.co", "engine": "procedural", "maxJobs": NaN}',
        b'{"account": "US:a@b.co", "engine": "procedural", "settings": {"x": Infinity}}',
        b'{"account": "US:a@b.co", "engine": "procedural", "maxJobs": 1e400}',
        b'{"settings": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    ],
)
async def test_json_python_takes_but_json_does_not_is_400(harness: Harness, body: bytes) -> None:
    headers = {**harness.auth, "Content-Type": "application/json"}
    for path in ("/accounts", "/images"):
        reply = await harness.client.post(f"/v1/dreamina{path}", content=body, headers=headers)
        assert reply.status_code == 400
        assert reply.json() == {"error": "Request body is not valid JSON"}


async def test_max_jobs_in_a_request_can_raise_the_cap_of_ones_own_account(
    settings: Settings,
) -> None:
    engine = CancellableEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        await harness.put_account({**STUDIO, "maxJobs": 1})
        named = {**SMALL, "account": STUDIO["account"]}
        assert (await harness.post(named)).status_code == 200
        assert (await harness.post(named)).status_code == 429
        assert (await harness.post({**named, "maxJobs": 2})).status_code == 200
        assert (await harness.post({**named, "maxJobs": 2})).status_code == 429


async def test_a_save_in_the_same_millisecond_still_gives_the_engine_the_new_key(
    settings: Settings,
) -> None:
    KeyedEngine.seen_keys = []
    clock = FakeClock()  # frozen: every save happens at the same instant
    async with open_harness(settings, clock=clock, engines=ENGINES) as harness:
        body = {**STUDIO, "engine": "keyed"}
        await harness.put_account({**body, "settings": {"apiKey": "sk-wrong"}})
        failed = await harness.wait(
            (await harness.post({**SMALL, "account": STUDIO["account"]})).json()["jobid"]
        )
        assert failed["status"] == "failed"
        await harness.put_account({**body, "settings": {"apiKey": KEY}})
        done = await harness.wait(
            (await harness.post({**SMALL, "account": STUDIO["account"]})).json()["jobid"]
        )
        assert done["status"] == "completed"
        assert KeyedEngine.seen_keys == ["sk-wrong", KEY]


async def test_an_account_fixed_while_a_failing_job_runs_stays_fixed(settings: Settings) -> None:
    gate, entered = asyncio.Event(), asyncio.Event()

    class SlowKeyed(KeyedEngine):
        async def generate(self, request, progress, cancel):  # type: ignore[no-untyped-def]
            entered.set()
            await gate.wait()
            return await super().generate(request, progress, cancel)

    KeyedEngine.seen_keys = []
    async with open_harness(settings, engines={**BUILTIN, "keyed": SlowKeyed}) as harness:
        body = {**STUDIO, "engine": "keyed"}
        await harness.put_account({**body, "settings": {"apiKey": "sk-wrong"}})
        jobid = (await harness.post({**SMALL, "account": STUDIO["account"]})).json()["jobid"]
        await entered.wait()  # the job runs with the wrong key
        await harness.put_account({**body, "settings": {"apiKey": KEY}})
        gate.set()
        assert (await harness.wait(jobid))["error"] == "Upstream refused the API key"
        shown = (await harness.call("GET", f"/accounts/{STUDIO['account']}")).json()
        assert "error" not in shown
        again = await harness.post({**SMALL, "account": STUDIO["account"]})
        assert (await harness.wait(again.json()["jobid"]))["status"] == "completed"


@pytest.mark.both_databases
async def test_jobs_admitted_while_their_account_is_deleted_are_all_cancelled(
    settings: Settings,
) -> None:
    """On PostgreSQL admissions and the delete really race: each admission commits before the
    delete (its job is cancelled by it) or finds no account."""
    engine = CancellableEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        for _ in range(5):
            await harness.put_account({**STUDIO, "maxJobs": 50})
            named = {**SMALL, "account": STUDIO["account"]}
            posts = [harness.post(named) for _ in range(12)]
            delete = harness.call("DELETE", f"/accounts/{STUDIO['account']}")
            replies = await asyncio.gather(*posts[:6], delete, *posts[6:])
            for reply in replies[:6] + replies[7:]:
                assert reply.status_code in (200, 404), reply.text
                if reply.status_code == 200:
                    record = await harness.wait(reply.json()["jobid"])
                    assert (record["error"], record["errorDetails"]) == (
                        "Cancelled by user",
                        "Account US:studio@example.com was deleted",
                    )
