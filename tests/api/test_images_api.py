"""POST /images and GET /images/<jobid> through the ASGI app: statuses, messages, shapes."""

from __future__ import annotations

import io
import json
import re
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import update
from support import SEED_BODY, SMALL, FailingEngine, Harness, open_harness

from dreamserve.engines.procedural import ProceduralEngine
from dreamserve.errors import JobFailed
from dreamserve.settings import Settings
from dreamserve.storage.tables import accounts

pytestmark = pytest.mark.anyio

JOBID = re.compile(r"j\d{10}\d{3}\d{6}i-u1-LOCAL:procedural-bot:dreamina")
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
IMAGE_KEYS = {"imageUrl", "imageUri", "width", "height", "format", "assetId", "assetRef", "itemId"}
# The procedural engine honours seeds: its images report theirs.
SEEDED_IMAGE_KEYS = IMAGE_KEYS | {"seed"}


# Auth


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Token user:1-aaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "Bearer user:1-short",
        "Bearer user:1-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "Bearer not-a-token-at-all-xxxxxxxxxxxxxxxxxxxx",
    ],
)
async def test_missing_or_wrong_token_is_401(harness: Harness, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for reply in (
        await harness.client.post("/v1/dreamina/images", json=SMALL, headers=headers),
        await harness.client.get("/v1/dreamina/images/anything", headers=headers),
    ):
        assert reply.status_code == 401
        assert reply.json() == {"error": "Unauthorized"}


async def test_a_token_with_another_users_id_is_401(harness: Harness) -> None:
    _, token = await harness.service.tokens.create()
    secret = token.split("-", 1)[1]
    reply = await harness.post(SMALL, token=f"user:1-{secret}")
    assert reply.status_code == 401
    assert reply.json() == {"error": "Unauthorized"}


async def test_bearer_scheme_is_case_insensitive(harness: Harness) -> None:
    headers = {"Authorization": f"bearer {harness.token}"}
    reply = await harness.client.post("/v1/dreamina/images", json=SMALL, headers=headers)
    assert reply.status_code == 200


# POST /images


async def test_the_seed_request_returns_the_created_record(harness: Harness) -> None:
    reply = await harness.post(SEED_BODY)
    assert reply.status_code == 200
    body = reply.json()
    assert set(body) == {
        "jobid",
        "type",
        "status",
        "model",
        "created",
        "request",
        "response",
        "code",
    }
    assert JOBID.fullmatch(body["jobid"])
    assert ISO.fullmatch(body["created"])
    assert (body["type"], body["status"], body["model"], body["code"]) == (
        "image",
        "created",
        "seedream-4.0",
        200,
    )
    assert body["request"] == {**SEED_BODY, "inputMode": "generate"}
    assert body["response"] == {"forecastCost": 0}


async def test_multipart_form_values_are_converted(harness: Harness) -> None:
    fields = {
        "prompt": "a form post",
        "model": "nano-banana",
        "count": "1",
        "imageStrength": "0.25",
    }
    reply = await harness.client.post(
        "/v1/dreamina/images", data=fields, files={"_": (None, "")}, headers=harness.auth
    )
    assert reply.status_code == 200, reply.text
    assert reply.request.headers["content-type"].startswith("multipart/form-data")
    request = reply.json()["request"]
    assert (request["count"], request["imageStrength"], request["ratio"]) == (1, 0.25, "auto")
    record = await harness.wait(reply.json()["jobid"])
    assert len(record["response"]["images"]) == 1


async def test_urlencoded_forms_are_accepted(harness: Harness) -> None:
    reply = await harness.client.post(
        "/v1/dreamina/images", data={"prompt": "x", "count": "2"}, headers=harness.auth
    )
    assert reply.status_code == 200
    assert reply.json()["request"]["count"] == 2


async def test_a_validation_error_is_the_contracts_400(harness: Harness) -> None:
    reply = await harness.post({**SEED_BODY, "model": "invalid-model"})
    assert reply.status_code == 400
    assert reply.json() == {
        "error": "Parameter model (invalid-model) valid values: seedream-5.0-lite, seedream-4.7, "
        "seedream-4.6, seedream-4.5, seedream-4.1, seedream-4.0, nano-banana, seedream-3.0, "
        "gpt-image-2"
    }


async def test_a_file_in_a_form_is_refused(harness: Harness) -> None:
    reply = await harness.client.post(
        "/v1/dreamina/images", files={"prompt": ("p.txt", b"hello")}, headers=harness.auth
    )
    assert reply.status_code == 400
    assert reply.json() == {"error": "Parameter prompt must be a text field, not a file"}


@pytest.mark.parametrize(
    ("content", "content_type", "message"),
    [
        (b"{not json", "application/json", "Request body is not valid JSON"),
        (b"\xff\xfe", "application/json", "Request body is not valid JSON"),
        (b"[1, 2]", "application/json", "Request body must be a JSON object"),
        (b'"text"', "application/json", "Request body must be a JSON object"),
        (b"[" * 100_000, "application/json", "Request body is not valid JSON"),
        (
            b"prompt=x",
            "text/plain",
            "Content-Type (text/plain) not supported. Valid values: application/json, "
            "multipart/form-data, application/x-www-form-urlencoded",
        ),
        (b"", "application/json", "Parameter prompt is required"),
    ],
)
async def test_bodies_that_are_not_a_json_object_or_form(
    harness: Harness, content: bytes, content_type: str, message: str
) -> None:
    headers = {**harness.auth, "Content-Type": content_type}
    reply = await harness.client.post("/v1/dreamina/images", content=content, headers=headers)
    assert reply.status_code == 400
    assert reply.json() == {"error": message}


async def test_a_body_over_the_limit_is_413(harness: Harness) -> None:
    reply = await harness.post({"prompt": "x" * 1_100_000})
    assert reply.status_code == 413
    assert reply.json() == {"error": "Request body too large (limit 1048576 bytes)"}


async def test_a_streamed_body_over_the_limit_is_413(harness: Harness) -> None:
    async def chunks():
        for _ in range(40):
            yield b"x" * 65536

    headers = {**harness.auth, "Content-Type": "application/json"}
    reply = await harness.client.post("/v1/dreamina/images", content=chunks(), headers=headers)
    assert reply.status_code == 413
    assert reply.json() == {"error": "Request body too large (limit 1048576 bytes)"}


async def test_a_named_account_that_does_not_exist_is_404(harness: Harness) -> None:
    reply = await harness.post({**SMALL, "account": "US:nobody@example.com"})
    assert reply.status_code == 404
    assert reply.json() == {
        "error": "Unable to find configuration for account US:nobody@example.com"
    }


async def test_no_account_serving_the_model_is_400(harness: Harness) -> None:
    await harness.execute(update(accounts).values(models=["seedream-4.0"]))
    reply = await harness.post(SMALL)
    assert reply.status_code == 400
    assert reply.json() == {"error": "No account serves model nano-banana"}
    reply = await harness.post({**SMALL, "account": "LOCAL:procedural"})
    assert reply.status_code == 400
    assert reply.json() == {"error": "Account LOCAL:procedural does not serve model nano-banana"}
    assert (await harness.post({**SMALL, "model": "seedream-4.0"})).status_code == 200


async def test_an_account_in_error_is_skipped(harness: Harness) -> None:
    await harness.execute(update(accounts).values(error="upstream refused the key"))
    reply = await harness.post(SMALL)
    assert reply.status_code == 400
    assert reply.json() == {"error": "No account serves model nano-banana"}
    reply = await harness.post({**SMALL, "account": "LOCAL:procedural"})
    assert reply.json() == {
        "error": "Account LOCAL:procedural is in error: upstream refused the key"
    }


# GET /images/<jobid> and the finished record


@pytest.mark.both_databases
async def test_a_job_runs_to_completed_with_the_contracts_image_fields(harness: Harness) -> None:
    created = (await harness.post({**SMALL, "count": 2})).json()
    record = await harness.wait(created["jobid"])
    assert record["status"] == "completed"
    assert set(record) == {
        "jobid", "type", "status", "model", "created", "updated", "request", "response", "code",
    }  # fmt: skip
    assert record["request"] == created["request"]
    assert ISO.fullmatch(record["updated"])
    images = record["response"]["images"]
    assert len(images) == 2
    assert record["response"]["forecastCost"] == 0
    for image in images:
        assert set(image) == SEEDED_IMAGE_KEYS
        assert (image["width"], image["height"], image["format"]) == (1024, 1024, "jpeg")
        assert re.fullmatch(r"\d{19}", image["itemId"])
        assert image["assetId"] == f"LOCAL:procedural:{image['itemId']}"
        download = await harness.client.get(image["imageUrl"])
        assert image["assetRef"] == (
            f"LOCAL:procedural-image:w1024:h1024:s{len(download.content)}-uri:{image['imageUri']}"
        )
        assert image["imageUrl"].startswith(
            f"http://testserver/v1/dreamina/files/{image['imageUri']}?"
        )
    assert images[0]["itemId"] != images[1]["itemId"]


async def test_default_count_is_four_images(harness: Harness) -> None:
    created = (await harness.post({"prompt": "four", "model": "nano-banana"})).json()
    record = await harness.wait(created["jobid"])
    assert len(record["response"]["images"]) == 4


async def test_get_accepts_the_jobid_raw_or_percent_encoded(harness: Harness) -> None:
    jobid = (await harness.post(SMALL)).json()["jobid"]
    raw = await harness.get(jobid)
    encoded = await harness.get(quote(jobid, safe=""))
    twice = await harness.get(quote(quote(jobid, safe=""), safe=""))
    assert raw.status_code == encoded.status_code == twice.status_code == 200
    assert raw.json()["jobid"] == encoded.json()["jobid"] == twice.json()["jobid"] == jobid


async def test_an_unknown_job_is_404(harness: Harness) -> None:
    reply = await harness.get("j0101000000000000000i-u1-LOCAL:procedural-bot:dreamina")
    assert reply.status_code == 404
    assert reply.json() == {
        "error": "Job j0101000000000000000i-u1-LOCAL:procedural-bot:dreamina not found"
    }


LONG_ID = "j" + "7" * 9_999  # 10,000 characters: echoed cut, as 400s cut values


def cut(text: str) -> str:
    return text[:299] + "…"


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("GET", f"/images/{LONG_ID}", f"Job {cut(LONG_ID)} not found"),
        ("GET", f"/images/{LONG_ID}/webhooks", f"Job {cut(LONG_ID)} not found"),
        ("DELETE", f"/scheduler/{LONG_ID}", f"Job {cut(LONG_ID)} not found"),
        ("DELETE", f"/assets/{LONG_ID}", f"Asset {cut(LONG_ID)} not found"),
        (
            "GET",
            f"/assets/A:{LONG_ID}",
            f"Unable to find configuration for account {cut('A:' + LONG_ID)}",
        ),
        ("GET", f"/accounts/{LONG_ID}", f"Unable to find configuration for account {cut(LONG_ID)}"),
        (
            "DELETE",
            f"/accounts/{LONG_ID}",
            f"Unable to find configuration for account {cut(LONG_ID)}",
        ),
    ],
)
async def test_a_404_cuts_a_long_id_to_300_characters(
    harness: Harness, method: str, path: str, message: str
) -> None:
    reply = await harness.call(method, path)
    assert (reply.status_code, reply.json()) == (404, {"error": message})


async def test_a_404_never_cuts_a_well_formed_id(harness: Harness) -> None:
    """The longest: a jobid of user 10**18-1 on an account id of 32 + 1 + 200 characters."""
    jobid = f"j0101000000000000000i-u{'9' * 18}-{'R' * 32}:{'n' * 200}-bot:dreamina"
    assert len(jobid) == 288
    reply = await harness.get(jobid)
    assert (reply.status_code, reply.json()) == (404, {"error": f"Job {jobid} not found"})


async def test_another_users_job_is_404_as_if_it_did_not_exist(harness: Harness) -> None:
    jobid = (await harness.post(SMALL)).json()["jobid"]
    _, other = await harness.service.tokens.create()
    reply = await harness.get(jobid, token=other)
    assert reply.status_code == 404
    assert reply.json() == {"error": f"Job {jobid} not found"}


async def test_same_seed_same_request_gives_identical_files(harness: Harness) -> None:
    body = {**SMALL, "seed": 99}
    first = await harness.wait((await harness.post(body)).json()["jobid"])
    second = await harness.wait((await harness.post(body)).json()["jobid"])
    other = await harness.wait((await harness.post({**body, "seed": 100})).json()["jobid"])
    files = [
        (await harness.client.get(record["response"]["images"][0]["imageUrl"])).content
        for record in (first, second, other)
    ]
    assert files[0] == files[1]
    assert files[0] != files[2]


async def completed(harness: Harness, body: dict[str, Any]) -> dict[str, Any]:
    """The record of a job of `body` once it ended."""
    return await harness.wait((await harness.post(body)).json()["jobid"])


async def files(harness: Harness, record: dict[str, Any]) -> list[bytes]:
    """The stored bytes of a completed job's images, fetched through their imageUrl."""
    return [
        (await harness.client.get(image["imageUrl"])).content
        for image in record["response"]["images"]
    ]


async def test_image_i_reports_seed_plus_i_and_that_seed_alone_makes_it_again(
    harness: Harness,
) -> None:
    body = {**SMALL, "seed": 2_000, "count": 3}
    first = await completed(harness, body)
    assert [image["seed"] for image in first["response"]["images"]] == [2_000, 2_001, 2_002]
    again = await completed(harness, {**body, "seed": 2_002, "count": 1})
    assert [image["seed"] for image in again["response"]["images"]] == [2_002]
    made = await files(harness, first)
    assert (await files(harness, again)) == [made[2]]  # byte for byte
    assert len(set(made)) == 3


async def test_seeds_wrap_past_the_largest_so_each_is_one_a_request_may_give(
    harness: Harness,
) -> None:
    body = {**SMALL, "seed": 2_147_483_646, "count": 3}
    first = await completed(harness, body)
    seeds = [image["seed"] for image in first["response"]["images"]]
    assert seeds == [2_147_483_646, 2_147_483_647, 0]
    again = await completed(harness, {**body, "seed": 0, "count": 1})
    assert (await files(harness, again)) == (await files(harness, first))[2:]


async def test_without_a_seed_the_server_picks_one_and_reports_it(harness: Harness) -> None:
    created = [(await harness.post(SMALL)).json() for _ in range(2)]
    assert all("seed" not in record["request"] for record in created)  # the echo as sent
    records = [await harness.wait(record["jobid"]) for record in created]
    assert all("seed" not in record["request"] for record in records)
    seeds = [record["response"]["images"][0]["seed"] for record in records]
    assert all(isinstance(seed, int) and 0 <= seed <= 2_147_483_647 for seed in seeds)
    assert seeds[0] != seeds[1]
    made = [await files(harness, record) for record in records]
    assert made[0] != made[1]  # the same prompt, another picture
    # The picked seed reproduces the picture.
    again = await completed(harness, {**SMALL, "seed": seeds[0]})
    assert (await files(harness, again)) == made[0]


async def test_an_engine_that_does_not_honour_seeds_reports_none(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ProceduralEngine, "seeded", False)
    record = await completed(harness, {**SMALL, "seed": 5})
    assert set(record["response"]["images"][0]) == IMAGE_KEYS


async def test_different_prompts_give_different_images(harness: Harness) -> None:
    records = [
        await harness.wait((await harness.post({**SMALL, "prompt": prompt})).json()["jobid"])
        for prompt in ("a quiet harbour at dawn", "neon city in the rain")
    ]
    grey = []
    for record in records:
        content = (await harness.client.get(record["response"]["images"][0]["imageUrl"])).content
        grey.append(np.asarray(Image.open(io.BytesIO(content)).convert("L"), dtype=np.float32))
    assert np.abs(grey[0] - grey[1]).mean() > 10


async def test_a_completed_image_is_usable_as_a_reference(harness: Harness) -> None:
    source = await harness.wait((await harness.post(SMALL)).json()["jobid"])
    ref = source["response"]["images"][0]["assetRef"]
    reply = await harness.post({"model": "seedream-4.0", "imageRef_1": ref, "count": 1})
    assert reply.status_code == 200, reply.text
    assert reply.json()["request"]["inputMode"] == "reference"
    assert reply.json()["request"]["imageRef_1"] == ref
    record = await harness.wait(reply.json()["jobid"])
    assert record["status"] == "completed"
    image = record["response"]["images"][0]
    assert (image["width"], image["height"]) == (2048, 2048)  # auto: nearest to a square reference


@pytest.mark.both_databases
async def test_a_reference_that_is_not_an_image_of_the_user_is_400(harness: Harness) -> None:
    source = await harness.wait((await harness.post(SMALL)).json()["jobid"])
    ref = source["response"]["images"][0]["assetRef"]
    forged = ref.replace("-image:w1024:", "-image:w1025:")
    _, other = await harness.service.tokens.create()
    for token, value in ((harness.token, forged), (other, ref)):
        reply = await harness.post({"prompt": "x", "imageRef_1": value}, token=token)
        assert reply.status_code == 400
        assert reply.json() == {
            "error": f"Parameter imageRef_1 ({value[:99]}…) valid values: an assetRef of an "
            "existing image of yours"
            if len(value) > 100
            else f"Parameter imageRef_1 ({value}) valid values: an assetRef of an existing image "
            "of yours"
        }


@pytest.mark.both_databases
@pytest.mark.parametrize(
    ("error", "message", "details"),
    [
        (
            JobFailed("The prompt was refused", "policy: violence"),
            "The prompt was refused",
            "policy: violence",
        ),
        (RuntimeError("boom"), "Image generation failed", "RuntimeError (see the server log)"),
    ],
)
async def test_an_engine_failure_fails_the_job_and_frees_the_slot(
    settings: Settings, error: Exception, message: str, details: str
) -> None:
    engine = FailingEngine(error)
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        record = await harness.wait((await harness.post(SMALL)).json()["jobid"])
        assert record["status"] == "failed"
        assert (record["error"], record["errorDetails"]) == (message, details)
        assert "images" not in record["response"]
        assert await harness.slots() == {"LOCAL:procedural": 0}


# Errors outside the routes keep the {"error"} shape


async def test_unknown_paths_and_methods_answer_with_an_error_body(harness: Harness) -> None:
    missing = await harness.client.get("/v1/dreamina/nothing-here", headers=harness.auth)
    assert (missing.status_code, missing.json()) == (404, {"error": "Not Found"})
    wrong = await harness.client.delete("/v1/dreamina/images", headers=harness.auth)
    assert (wrong.status_code, wrong.json()) == (405, {"error": "Method Not Allowed"})
    assert wrong.headers["allow"] == "GET, POST"  # GET: the user's jobs


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v1/dreamina/accounts", "GET, POST"),
        ("POST", "/v1/dreamina/accounts/LOCAL:procedural", "GET, DELETE"),
        ("PATCH", "/v1/dreamina/webhooks/secret", "GET, POST"),
        ("PUT", "/v1/dreamina/images/j1/webhooks", "GET, POST"),
        # one path shape, two operations: an account's assets (GET, POST), an asset (DELETE)
        ("OPTIONS", "/v1/dreamina/assets/x", "GET, POST, DELETE"),
    ],
)
async def test_a_405_allows_every_method_served_at_the_path(
    harness: Harness, method: str, path: str, allow: str
) -> None:
    reply = await harness.client.request(method, path, headers=harness.auth)
    assert (reply.status_code, reply.json()) == (405, {"error": "Method Not Allowed"})
    assert reply.headers["allow"] == allow


async def test_models_lists_the_catalogue(harness: Harness) -> None:
    reply = await harness.client.get("/v1/dreamina/models", headers=harness.auth)
    assert reply.status_code == 200
    models = reply.json()["models"]
    assert [m["model"] for m in models] == [
        "seedream-5.0-lite", "seedream-4.7", "seedream-4.6", "seedream-4.5", "seedream-4.1",
        "seedream-4.0", "nano-banana", "seedream-3.0", "gpt-image-2",
    ]  # fmt: skip
    assert models[5]["sizes"]["2k"]["16:9"] == "2560x1440"
    assert [m["regions"] for m in models] == [None, ["CA"], *[None] * 6, ["CA"]]
    assert reply.json()["default"] == "seedream-4.6"  # the hosted API's
    assert (await harness.client.get("/v1/dreamina/models")).status_code == 401


# Input that once reached a 500


@pytest.mark.parametrize(
    "ref",
    [
        "LOCAL:procedural-image:w0:h0:s1-uri:images/a.jpg",
        "LOCAL:procedural-image:w0:h5:s1-uri:images/a.jpg",
        "LOCAL:procedural-image:w" + "9" * 400 + ":h5:s1-uri:images/a.jpg",
        "LOCAL:procedural-image:w" + "9" * 5000 + ":h5:s1-uri:images/a.jpg",
        "LOCAL:procedural-image:w\u0661\u0662:h5:s1-uri:images/a.jpg",  # Arabic-Indic digits
    ],
)
async def test_asset_refs_with_impossible_sizes_are_400(harness: Harness, ref: str) -> None:
    reply = await harness.post({"prompt": "x", "imageRef_1": ref})  # ratio auto: uses the size
    assert reply.status_code == 400
    shown = ref if len(ref) <= 100 else ref[:99] + "…"
    assert reply.json() == {
        "error": f"Parameter imageRef_1 ({shown}) valid values: an assetRef from POST /assets "
        "or from a completed job's images"
    }


@pytest.mark.both_databases
@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "half a pair \\ud800"}',
        b'{"prompt": "nul \\u0000 inside"}',
        b'{"prompt": "x", "replyRef": "\\u0000"}',
        b'{"prompt": "x", "\\udfff": 1}',
        b'{"prompt": "x", "seed": ["\\ud800"]}',
        '{"prompt": "raw \ud800 bytes"}'.encode("utf-8", "surrogatepass"),  # CESU-8, decoded
        '{"prompt": "in UTF-16 \\ud800"}'.encode("utf-16"),
    ],
)
async def test_text_that_cannot_be_stored_is_400(harness: Harness, body: bytes) -> None:
    headers = {**harness.auth, "Content-Type": "application/json"}
    reply = await harness.client.post("/v1/dreamina/images", content=body, headers=headers)
    assert reply.status_code == 400
    assert reply.json() == {
        "error": "Request body has text with NUL or unpaired surrogate characters"
    }
    assert await harness.slots() == {"LOCAL:procedural": 0}


async def test_a_body_in_utf_16_is_read_as_json(harness: Harness) -> None:
    body = json.dumps({"prompt": "ünïcode ✓", "count": 1}).encode("utf-16")
    headers = {**harness.auth, "Content-Type": "application/json"}
    reply = await harness.client.post("/v1/dreamina/images", content=body, headers=headers)
    assert reply.status_code == 200
    assert reply.json()["request"]["prompt"] == "ünïcode ✓"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"prompt": "x", "seed": 123456789012345678901234567890}',
            "Parameter seed (123456789012345678901234567890) valid values: integer 0-2147483647",
        ),
        (
            b'{"prompt": "x", "count": -98765432109876543210}',
            "Parameter count (-98765432109876543210) valid values: integer 1-4",
        ),
        (
            b'{"prompt": "x", "seed": -9223372036854775809}',  # 19 digits, below 64 bits
            "Parameter seed (-9223372036854775809) valid values: integer 0-2147483647",
        ),
        (  # deeper than the standard library reads, not than orjson does
            b'{"prompt": "x", "extra": ' + b"[" * 1000 + b"]" * 1000 + b"}",
            "Request body is not valid JSON",
        ),
        (
            b'{"prompt": "x", "model": ' + b"[" * 1020 + b"]" * 1020 + b"}",
            "Request body is not valid JSON",
        ),
        (b'{"prompt": "x", "imageStrength": NaN}', "Request body is not valid JSON"),
        (b'{"prompt": "x", "imageStrength": -Infinity}', "Request body is not valid JSON"),
        (b'{"prompt": "x", "imageStrength": 1e400}', "Request body is not valid JSON"),
    ],
)
async def test_bodies_are_read_as_the_standard_library_reads_them(
    harness: Harness, body: bytes, message: str
) -> None:
    headers = {**harness.auth, "Content-Type": "application/json"}
    reply = await harness.client.post("/v1/dreamina/images", content=body, headers=headers)
    assert reply.status_code == 400
    assert reply.json() == {"error": message}
    assert await harness.slots() == {"LOCAL:procedural": 0}


async def test_a_nul_in_a_form_field_is_400(harness: Harness) -> None:
    reply = await harness.client.post(
        "/v1/dreamina/images", data={"prompt": "a\x00b"}, headers=harness.auth
    )
    assert reply.status_code == 400
    assert reply.json() == {
        "error": "Request body has text with NUL or unpaired surrogate characters"
    }


@pytest.mark.parametrize("jobid", ["ab%00cd", "%ud800", "j" * 500, "nonsense"])
async def test_a_path_that_is_no_jobid_is_404_without_a_query(harness: Harness, jobid: str) -> None:
    reply = await harness.get(jobid)
    assert reply.status_code == 404
    assert reply.json()["error"].startswith("Job ")


@pytest.mark.both_databases
async def test_a_jobid_made_twice_is_made_again(harness: Harness) -> None:
    """Two processes can, rarely, make the same jobid: the unique constraint refuses the second
    and admission retries with a new one, giving back the slot of the failed attempt."""
    first = (await harness.post(SMALL)).json()["jobid"]
    made = harness.server.ids.jobid
    repeats = iter([first])
    harness.server.ids.jobid = lambda *args: next(repeats, None) or made(*args)  # type: ignore[method-assign]
    reply = await harness.post(SMALL)
    assert reply.status_code == 200
    assert reply.json()["jobid"] != first
    await harness.wait(first)
    await harness.wait(reply.json()["jobid"])
    assert await harness.slots() == {"LOCAL:procedural": 0}


@pytest.mark.both_databases
async def test_a_job_whose_images_fail_to_store_leaves_none_behind(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The images of a job are stored side by side; when one cannot be, the job fails and the
    ones already written are deleted (nobody could ever fetch them)."""
    blobs = harness.server.blobs
    put = blobs.put
    written: list[str] = []

    async def second_fails(key: str, data: bytes) -> None:
        if len(written) == 1:
            written.append(key)
            raise OSError("Input/output error")
        written.append(key)
        await put(key, data)

    monkeypatch.setattr(blobs, "put", second_fails)
    posted = await harness.post({**SMALL, "count": 3})
    record = await harness.wait(posted.json()["jobid"])
    assert (record["status"], record["error"], record["errorDetails"]) == (
        "failed",
        "Storage unavailable",
        "the server's image store cannot be reached; try again later",
    )
    assert len(written) == 3
    assert not any(blobs.path(key).exists() for key in written)  # type: ignore[attr-defined]
