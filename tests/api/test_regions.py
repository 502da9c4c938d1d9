"""Region rules as catalogue data: a model the hosted API offers only to some regions
(seedream-4.7 and gpt-image-2: CA) is served by accounts of those regions and by this server's
own (LOCAL) accounts, never by another region's: refused when an account lists it, and never
chosen for its jobs."""

from __future__ import annotations

import pytest
from support import Harness

pytestmark = [pytest.mark.anyio]

JOB = {"prompt": "a lighthouse", "model": "gpt-image-2", "count": 1}


async def test_an_account_of_another_region_cannot_list_a_ca_model(harness: Harness) -> None:
    for model in ("gpt-image-2", "seedream-4.7"):
        body = {"account": "US:studio", "engine": "procedural", "models": ["seedream-4.0", model]}
        reply = await harness.call("POST", "/accounts", body)
        assert (reply.status_code, reply.json()) == (
            400,
            {
                "error": f"Parameter models ({model}) is offered to region CA accounts only, "
                "not to region US"
            },
        )
    assert "US:studio" not in (await harness.call("GET", "/accounts")).json()  # nothing saved


@pytest.mark.parametrize("name", ["CA:studio", "LOCAL:gpu0"])
async def test_ca_and_local_accounts_may_list_it(harness: Harness, name: str) -> None:
    body = {"account": name, "engine": "procedural", "models": ["gpt-image-2", "seedream-4.7"]}
    saved = await harness.put_account(body)
    assert saved["models"] == {"image": ["gpt-image-2", "seedream-4.7"]}


async def test_an_account_serving_every_model_serves_only_its_regions(harness: Harness) -> None:
    us = await harness.put_account({"account": "US:studio", "engine": "procedural"})
    ca = await harness.put_account({"account": "CA:studio", "engine": "procedural"})
    assert "gpt-image-2" not in us["models"]["image"]
    assert "seedream-4.7" not in us["models"]["image"]
    assert ca["models"]["image"][-1] == "gpt-image-2"
    assert "seedream-4.7" in ca["models"]["image"]


async def test_jobs_for_a_ca_model_go_only_to_ca_accounts(harness: Harness) -> None:
    await harness.sideline_placeholder()
    await harness.put_account({"account": "US:studio", "engine": "procedural", "maxJobs": 50})
    await harness.put_account({"account": "CA:studio", "engine": "procedural", "maxJobs": 50})
    for _ in range(12):
        reply = await harness.post(JOB)
        assert reply.status_code == 200, reply.text
        assert "-CA:studio-" in reply.json()["jobid"]
    # Another model goes to either.
    others = {
        (await harness.post({**JOB, "model": "seedream-4.6", "resolution": "2k"}))
        .json()["jobid"]
        .split("-")[2]
        for _ in range(12)
    }
    assert others == {"US:studio", "CA:studio"}


async def test_a_ca_model_with_only_other_regions_is_the_no_account_400(
    harness: Harness,
) -> None:
    await harness.sideline_placeholder()
    await harness.put_account({"account": "US:studio", "engine": "procedural"})
    reply = await harness.post(JOB)
    assert (reply.status_code, reply.json()) == (
        400,
        {"error": "No account serves model gpt-image-2"},
    )
    named = await harness.post({**JOB, "account": "US:studio"})
    assert (named.status_code, named.json()) == (
        400,
        {"error": "Account US:studio does not serve model gpt-image-2"},
    )


async def test_the_placeholder_serves_the_ca_models(harness: Harness) -> None:
    reply = await harness.post(JOB)
    assert reply.status_code == 200, reply.text
    record = await harness.wait(reply.json()["jobid"])
    assert record["status"] == "completed"
    image = record["response"]["images"][0]
    assert (image["width"], image["height"]) == (1024, 1024)
