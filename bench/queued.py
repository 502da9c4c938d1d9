"""The optional queue's drain rate (issue 16): 1,000 tiny jobs over 4 slots submitted at once
with `queueSeconds` (they wait in the account's queue and take slots as they free) against
the same 1,000 jobs submitted as slots free (4 clients, each submitting its next job when its
last one ended: no queue). The queue passes when it drains at >= 0.9 of that rate.

The real `dreamserve serve` (SQLite, the embedded default) with bench/sleep_engine.py's engine
(each job waits `--job-ms`, no CPU) as a plugin, on one account of 4 slots; rounds alternate
the two modes, each on a fresh data dir.

    .venv/bin/python bench/queued.py [--jobs 1000] [--slots 4] [--job-ms 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from scale import CONFIG, HERE, Process, free_port, plugin_site

ACCOUNT = "LOCAL:q"
JOB = {"prompt": "waits", "model": "bench-wait", "count": 1, "account": ACCOUNT}


def start(root: Path, slots: int, job_ms: int) -> tuple[Process, str]:
    site = plugin_site(root / "site")
    config = root / "dreamserve.toml"
    config.write_text(
        CONFIG
        + f'\n[[accounts]]\naccount = "{ACCOUNT}"\nengine = "sleep"\nmaxJobs = {slots}\n'
        + f'models = ["bench-wait"]\nsettings = {{ seconds = {job_ms / 1000} }}\n'
    )
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(HERE), *sys.path]),
        "DREAMSERVE_DATA_DIR": str(root / "data"),
        "DREAMSERVE_CONFIG": str(config),
        "DREAMSERVE_PORT": str(port),
        "DREAMSERVE_ACCESS_LOG": "false",
        "DREAMSERVE_QUEUE_LIMIT": "100000",
    }
    server = Process(["serve"], env, "Uvicorn running on")
    return server, f"http://127.0.0.1:{port}"


async def ended(session: aiohttp.ClientSession, jobid: str) -> str:
    while True:
        async with session.get(f"/v1/dreamina/images/{jobid}?wait=30") as reply:
            status = str((await reply.json())["status"])
        if status != "created":
            return status


async def as_slots_free(url: str, token: str, jobs: int, slots: int) -> tuple[float, list[str]]:
    """`slots` clients, each submitting a job and waiting for its end, until `jobs` ran."""
    left = [jobs]
    statuses: list[str] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(url, headers=headers) as session:

        async def client() -> None:
            while left[0] > 0:
                left[0] -= 1
                async with session.post("/v1/dreamina/images", json=JOB) as reply:
                    assert reply.status == 200, await reply.text()
                    jobid = (await reply.json())["jobid"]
                statuses.append(await ended(session, jobid))

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(slots)))
        return time.monotonic() - started, statuses


async def queued(url: str, token: str, jobs: int) -> tuple[float, list[str]]:
    """Every job submitted at once (8 clients) with queueSeconds; until the last one ended."""
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(url, headers=headers, connector=connector) as session:
        started = time.monotonic()
        semaphore = asyncio.Semaphore(8)

        async def submit() -> str:
            async with (
                semaphore,
                session.post("/v1/dreamina/images", json={**JOB, "queueSeconds": 3600}) as reply,
            ):
                assert reply.status == 200, await reply.text()
                return str((await reply.json())["jobid"])

        jobids = await asyncio.gather(*(submit() for _ in range(jobs)))

        async def end(jobid: str) -> str:
            async with semaphore:
                return await ended(session, jobid)

        statuses = await asyncio.gather(*(end(jobid) for jobid in jobids))
        return time.monotonic() - started, list(statuses)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--job-ms", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ideal = args.jobs * args.job_ms / 1000 / args.slots
    print(
        f"{args.jobs} jobs of {args.job_ms} ms over {args.slots} slots "
        f"({ideal:.1f} s if nothing but the waits took time), {args.rounds} rounds"
    )
    ratios = []
    for round_ in range(args.rounds):
        rates = {}
        for mode in ("as slots free", "queued"):
            with tempfile.TemporaryDirectory() as scratch:
                server, url = start(Path(scratch), args.slots, args.job_ms)
                try:
                    if mode == "queued":
                        seconds, statuses = await queued(url, server.token(), args.jobs)
                    else:
                        seconds, statuses = await as_slots_free(
                            url, server.token(), args.jobs, args.slots
                        )
                finally:
                    server.stop()
            done = statuses.count("completed")
            assert done == args.jobs, f"{mode}: {done} of {args.jobs} completed"
            rates[mode] = args.jobs / seconds
            print(f"round {round_ + 1}, {mode}: {seconds:.2f} s, {rates[mode]:.1f} jobs/s")
        ratios.append(rates["queued"] / rates["as slots free"])
    median = statistics.median(ratios)
    verdict = "meets" if median >= 0.9 else "is below"
    shown = ", ".join(f"{ratio:.2f}" for ratio in ratios)
    print(f"queued over as slots free: {median:.2f} (rounds {shown}) {verdict} the 0.90 target")


if __name__ == "__main__":
    asyncio.run(main())
