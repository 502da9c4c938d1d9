"""A healthy tenant's webhook latency, alone and beside a hostile tenant, in one run.

Starts one uvicorn server with the settings `dreamserve serve` uses (bench/serve.py's
`dreamserve`: 64x64 `bench-tiny` jobs; webhook settings at their defaults, or as the
environment sets them) with DREAMSERVE_WEBHOOK_ALLOW_PRIVATE=true, and two users:

- the healthy tenant (user 2) submits `--healthy` jobs, one every `--pace` seconds, whose
  `replyUrl` is a receiver (bench/webhooks.py's, in this process) answering 200 at once;
  latency = the arrival's wall time - the record's `updated` (the job's end, whole milliseconds);
- the hostile tenant (user 1) submits `--hostile` jobs at once (8 submitters) whose `replyUrl`s
  go, in turn, to `--hosts` receivers that accept the connection, read the request and never
  answer (asyncio servers in this process): each try holds its place until the deliverer's
  timeout (10 s by default).

1. Alone: the healthy tenant's jobs, nothing else running.
2. Hostile: the hostile tenant's jobs, then (once tries to its receivers are open) the healthy
   tenant's again, paced the same way.

Prints each phase's healthy latency (p50 / p99 / max, how many arrived within `--wait`
seconds), the hostile/alone ratios, and what the hostile receivers saw during phase 2: the
most connections open at once (all its tries in flight), connections in all. The server is
pinned to CPU 0 and this process to the other CPUs where the machine has two or more.

    .venv/bin/python bench/webhook_fairness.py [--healthy 120] [--pace 0.25] [--hostile 200]
        [--hosts 8] [--wait 180]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import aiohttp
from api import BODY, Result, Server, pin_servers
from webhooks import Receiver, epoch

SUBMITTERS = 8
API = "/v1/dreamina"


class Silent:
    """`hosts` listening ports that accept, read and never answer; the connections open now
    (the deliverer's tries held there), the most at once, and how many in all."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.urls: list[str] = []
        self.transports: set[asyncio.BaseTransport] = set()
        self.peak = 0
        self.connections = 0
        self.opened = asyncio.Event()

    async def start(self, hosts: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(hosts):
            server = await loop.create_server(lambda: _Silence(self), "127.0.0.1", 0)
            self.servers.append(server)
            self.urls.append(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook")

    @property
    def open(self) -> int:
        return len(self.transports)

    def reset(self) -> None:
        self.peak = self.open
        self.connections = 0

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for transport in list(self.transports):
            transport.abort()
        for server in self.servers:
            await server.wait_closed()


class _Silence(asyncio.Protocol):
    """One connection to a Silent receiver: whatever comes is read and dropped."""

    def __init__(self, owner: Silent) -> None:
        self.owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.owner.transports.add(transport)
        self.owner.connections += 1
        self.owner.peak = max(self.owner.peak, self.owner.open)
        self.owner.opened.set()
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.transports.discard(self.transport)


async def submit_paced(server: Server, token: str, url: str, jobs: int, pace: float) -> list[str]:
    """`jobs` POST /images, one every `pace` seconds; the job ids."""
    headers = {"Authorization": f"Bearer {token}"}
    jobids = []
    async with aiohttp.ClientSession(headers=headers) as session:
        for _ in range(jobs):
            started = time.perf_counter()
            async with session.post(
                f"{server.url}{API}/images", json={**BODY, "replyUrl": url}
            ) as r:
                assert r.status == 200, await r.text()
                jobids.append(str((await r.json())["jobid"]))
            await asyncio.sleep(max(0.0, pace - (time.perf_counter() - started)))
    return jobids


async def submit_burst(server: Server, token: str, urls: list[str], jobs: int) -> None:
    """`jobs` POST /images from SUBMITTERS loops, their replyUrls taking `urls` in turn."""
    headers = {"Authorization": f"Bearer {token}"}
    left = list(range(jobs))
    connector = aiohttp.TCPConnector(limit=SUBMITTERS)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def submitter() -> None:
            while left:
                body = {**BODY, "replyUrl": urls[left.pop() % len(urls)]}
                async with session.post(f"{server.url}{API}/images", json=body) as reply:
                    assert reply.status == 200, await reply.text()

        await asyncio.gather(*(submitter() for _ in range(SUBMITTERS)))


async def healthy_phase(
    server: Server, token: str, receiver: Receiver, jobs: int, pace: float, wait: float
) -> Result:
    """The healthy tenant's jobs; the latency of their webhooks (as many as arrived)."""
    receiver.expect(jobs, 0.0)
    jobids = set(await submit_paced(server, token, receiver.url, jobs, pace))
    await receiver.wait(wait)
    result = Result(0.0)
    for arrival in receiver.arrivals:
        record = json.loads(arrival.body)
        if record["jobid"] in jobids:
            result.latencies.append(arrival.at - epoch(str(record["updated"])))
    return result


def row(name: str, result: Result, jobs: int) -> str:
    if not result.latencies:
        return f"  {name:<26}{0:>5}/{jobs:<4}"
    top = max(result.latencies) * 1000
    return (
        f"  {name:<26}{len(result.latencies):>5}/{jobs:<4}{result.percentile(0.5):>10.1f}"
        f"{result.percentile(0.99):>10.1f}{top:>10.1f}"
    )


async def run(args: argparse.Namespace) -> None:
    os.environ["DREAMSERVE_WEBHOOK_ALLOW_PRIVATE"] = "true"
    server_cpus = pin_servers()
    healthy, silent = Receiver(), Silent()
    await healthy.start()
    await silent.start(args.hosts)
    with tempfile.TemporaryDirectory() as scratch:
        server = Server("dreamserve", Path(scratch), server_cpus, ["--extra-users", "1"])
        try:
            assert server.process.stdout is not None
            hostile_token, healthy_token = server.token, server.process.stdout.readline().strip()
            alone = await healthy_phase(
                server, healthy_token, healthy, args.healthy, args.pace, args.wait
            )
            silent.reset()
            await submit_burst(server, hostile_token, silent.urls, args.hostile)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(silent.opened.wait(), 10)
            beside = await healthy_phase(
                server, healthy_token, healthy, args.healthy, args.pace, args.wait
            )
            hostile_peak, hostile_tries = silent.peak, silent.connections
        finally:
            server.stop()
            await healthy.stop()
            await silent.stop()
    settings = {
        name: os.environ.get(f"DREAMSERVE_{name}", "default")
        for name in (
            "WEBHOOK_CONCURRENCY",
            "WEBHOOK_CONCURRENCY_PER_USER",
            "WEBHOOK_CONCURRENCY_PER_HOST",
            "WEBHOOK_TIMEOUT_SECONDS",
        )
    }
    print(f"{os.cpu_count()} CPUs; settings: {settings}")
    print(
        f"healthy tenant: {args.healthy} jobs, one every {args.pace * 1000:g} ms; hostile: "
        f"{args.hostile} jobs to {args.hosts} receivers that never answer"
    )
    heads = "".join(f"{head:>10}" for head in ("arrived", "p50 ms", "p99 ms", "max ms"))
    print(f"  {'healthy webhook latency':<26}{heads}")
    print(row("alone", alone, args.healthy))
    print(row("beside the hostile tenant", beside, args.healthy))
    if alone.latencies and beside.latencies:
        ratios = [beside.percentile(q) / max(alone.percentile(q), 0.1) for q in (0.5, 0.99)] + [
            max(beside.latencies) / max(max(alone.latencies), 1e-4)
        ]
        print(f"  beside / alone: p50 {ratios[0]:.1f}x, p99 {ratios[1]:.1f}x, max {ratios[2]:.1f}x")
    print(
        f"  hostile receivers in phase 2: at most {hostile_peak} tries open at once, "
        f"{hostile_tries} connections in all"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--healthy", type=int, default=120, help="healthy tenant's jobs (120)")
    parser.add_argument("--pace", type=float, default=0.25, help="seconds between them (0.25)")
    parser.add_argument("--hostile", type=int, default=200, help="hostile tenant's jobs (200)")
    parser.add_argument("--hosts", type=int, default=8, help="its silent receivers (8)")
    parser.add_argument("--wait", type=float, default=180, help="longest wait for arrivals (180)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
