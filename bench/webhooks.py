"""Webhook delivery latency and rate, and the server CPU of waiting versus polling, in one run.

Starts two uvicorn servers with the settings `dreamserve serve` uses (bench/serve.py's
`dreamserve`, whose jobs run as 64x64 `bench-tiny` images, and `admission`, whose jobs are
admitted and never run), with DREAMSERVE_WEBHOOK_ALLOW_PRIVATE=true so that they may deliver to
127.0.0.1. A receiver (aiohttp.web, in this process, on 127.0.0.1) answers every delivery 200
and records when it arrived. Then:

1. Completion to arrival. Eight submitters (one keep-alive connection each) POST `--jobs` jobs
   (bench/api.py's body, count 1, with `replyUrl` the receiver) to `dreamserve`; each job's
   record arrives once it ends. Latency = the arrival's wall time - the record's `updated` (the
   end, whole milliseconds). Prints p50 / p99 / max and how many arrived, then checks every
   job's deliveries (GET /images/<jobid>/webhooks) for their status and number of tries.
2. Deliveries per second. Once all were delivered, POST /images/<jobid>/webhooks (redeliver)
   for every job at once, one connection each, and time from the first call until the receiver
   got all of them: deliveries / seconds. Twice: a receiver answering at once, and one that
   answers after 50 ms (the deliverer keeps up to 32 tries in flight). Every arrival's signature
   is checked afterwards (standardwebhooks, the user's secret from GET /webhooks/secret).
3. Waiting versus polling. On `admission`, one job (never ends); 500 clients, for `--seconds`,
   each (a) `wait`: loops GET /images/<jobid>?wait=60 (each answers at its deadline; with
   `--seconds` under 60, wait=that many seconds), then (b) `poll`: loops GET /images/<jobid>
   and a 1 s sleep. Both against the same server, one after the other, a fresh client session
   each, client starts spread over the first second. The server process's CPU seconds
   (utime + stime of /proc/<pid>/stat, all its threads) over each window, and over an idle
   window before them, are printed per minute with the requests made and the poll/wait ratio.

Servers are pinned to CPU 0 and this process (submitters, receiver, clients) to the other CPUs
where the machine has two or more.

    .venv/bin/python bench/webhooks.py [--jobs 300] [--seconds 60] [--skip-wait]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp
from aiohttp import web
from api import BODY, Result, Server, pin_servers
from standardwebhooks import Webhook

SUBMITTERS = 8
CLIENTS = 500
SLOW = 0.05  # seconds the slow receiver takes to answer
IDLE_SECONDS = 10.0
API = "/v1/dreamina"


@dataclass
class Arrival:
    at: float  # time.time() when the request reached the handler
    headers: dict[str, str]
    body: bytes


class Receiver:
    """The webhook receiver: records every POST to /hook and answers 200, after `delay`."""

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.expected = 0
        self.delay = 0.0
        self.complete = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self.runner, sock, backlog=1024).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def expect(self, count: int, delay: float) -> None:
        """Start a phase: forget earlier arrivals, await `count`, answer after `delay`."""
        self.arrivals = []
        self.expected = count
        self.delay = delay
        self.complete = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        at = time.time()
        body = await request.read()
        self.arrivals.append(Arrival(at, dict(request.headers), body))
        if len(self.arrivals) >= self.expected:
            self.complete.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=200)

    async def wait(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.complete.wait(), seconds)
        except TimeoutError:
            return False
        return True


@dataclass
class Calls:
    """What a batch of API calls got back."""

    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def shown(self) -> str:
        return ", ".join(f"{code}: {count}" for code, count in sorted(self.statuses.items()))

    def note(self, status: int, what: str, text: str) -> None:
        self.statuses[status] += 1
        if status != 200 and len(self.errors) < 5:
            self.errors.append(f"{what}: {status} {text[:200]}")


def largest_gap(times: list[float]) -> float:
    ordered = sorted(times)
    return max((b - a for a, b in itertools.pairwise(ordered)), default=0.0)


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def submit(server: Server, reply_url: str, jobs: int) -> tuple[list[str], Calls, float]:
    """`jobs` POST /images from SUBMITTERS concurrent loops; the job ids, the answers, seconds."""
    body = {**BODY, "replyUrl": reply_url}
    calls = Calls()
    jobids: list[str] = []
    left = jobs
    connector = aiohttp.TCPConnector(limit=SUBMITTERS)
    async with aiohttp.ClientSession(connector=connector, headers=server.auth) as session:

        async def submitter() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(f"{server.url}{API}/images", json=body) as reply:
                    text = await reply.text()
                calls.note(reply.status, "POST /images", text)
                if reply.status == 200:
                    jobids.append(json.loads(text)["jobid"])

        started = time.perf_counter()
        await asyncio.gather(*(submitter() for _ in range(SUBMITTERS)))
        return jobids, calls, time.perf_counter() - started


async def deliveries(server: Server, jobids: list[str]) -> tuple[Counter[str], int, Calls]:
    """The status of each job's latest delivery, the tries of all its deliveries in total."""
    statuses: Counter[str] = Counter()
    tries = 0
    calls = Calls()
    connector = aiohttp.TCPConnector(limit=SUBMITTERS)
    async with aiohttp.ClientSession(connector=connector, headers=server.auth) as session:

        async def one(jobid: str) -> None:
            nonlocal tries
            url = f"{server.url}{API}/images/{jobid}/webhooks"
            async with session.get(url) as reply:
                text = await reply.text()
            calls.note(reply.status, "GET /images/<id>/webhooks", text)
            if reply.status != 200:
                return
            found = json.loads(text)["deliveries"]
            statuses[found[-1]["status"] if found else "none"] += 1
            tries += sum(len(delivery["tries"]) for delivery in found)

        await asyncio.gather(*(one(jobid) for jobid in jobids))
    return statuses, tries, calls


async def settled(server: Server, jobids: list[str]) -> tuple[Counter[str], int, Calls]:
    """`deliveries` once none is pending (at most 60 s)."""
    for _ in range(120):
        statuses, tries, calls = await deliveries(server, jobids)
        if not statuses["pending"] and not calls.errors:
            break
        await asyncio.sleep(0.5)
    return statuses, tries, calls


@dataclass
class Round:
    delay: float
    count: int
    seconds: float  # first redeliver call to the last arrival (or to giving up)
    calls_seconds: float  # first redeliver call to the last answer
    arrived: int
    calls: Calls
    ids: Counter[str]  # webhook-ids of the arrivals
    gap: float  # the longest pause between two arrivals, seconds
    after: str = ""  # the jobs' latest deliveries once the round settled


async def redeliver(
    server: Server, receiver: Receiver, jobids: list[str], delay: float
) -> tuple[Round, list[Arrival]]:
    """Redeliver every job's record at once; the round, its arrivals."""
    receiver.expect(len(jobids), delay)
    calls = Calls()
    connector = aiohttp.TCPConnector(limit=len(jobids))
    async with aiohttp.ClientSession(connector=connector, headers=server.auth) as session:

        async def one(jobid: str) -> None:
            url = f"{server.url}{API}/images/{jobid}/webhooks"
            async with session.post(url) as reply:
                text = await reply.text()
            calls.note(reply.status, "POST /images/<id>/webhooks", text)

        started = time.time()
        await asyncio.gather(*(one(jobid) for jobid in jobids))
        calls_seconds = time.time() - started
    complete = await receiver.wait(120)
    arrivals = list(receiver.arrivals)
    last = max((a.at for a in arrivals[: len(jobids)]), default=started)
    seconds = (last if complete else time.time()) - started
    ids = Counter(a.headers.get("webhook-id", "") for a in arrivals)
    gap = largest_gap([a.at for a in arrivals])
    result = Round(delay, len(jobids), seconds, calls_seconds, len(arrivals), calls, ids, gap)
    return result, arrivals


async def signing_secret(server: Server) -> str:
    async with (
        aiohttp.ClientSession(headers=server.auth) as session,
        session.get(f"{server.url}{API}/webhooks/secret") as reply,
    ):
        return str((await reply.json())["secret"])


def unverified(secret: str, arrivals: list[Arrival]) -> int:
    """How many arrivals do not carry a valid signature by `secret`."""
    webhook = Webhook(secret)
    bad = 0
    for arrival in arrivals:
        headers = {name.lower(): value for name, value in arrival.headers.items()}
        try:
            webhook.verify(arrival.body, headers)
        except Exception:
            bad += 1
    return bad


async def deliveries_part(server: Server, jobs: int) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        receiver.expect(jobs, 0.0)
        jobids, submitted, submit_seconds = await submit(server, receiver.url, jobs)
        complete = await receiver.wait(120)
        first = list(receiver.arrivals)
        states, tries, listed = await settled(server, jobids)
        report_latency(jobs, jobids, submitted, submit_seconds, complete, first, states, tries)
        for problem in submitted.errors + listed.errors:
            print(f"  ! {problem}")
        if not jobids:
            return
        original = Counter(a.headers.get("webhook-id", "") for a in first)
        rounds: list[Round] = []
        every = list(first)
        for delay in (0.0, SLOW):
            result, arrivals = await redeliver(server, receiver, jobids, delay)
            rounds.append(result)
            every += arrivals
            result_states, result_tries, _ = await settled(server, jobids)
            shown = ", ".join(f"{state} {n}" for state, n in sorted(result_states.items()))
            result.after = f"then latest deliveries: {shown}; tries in all: {result_tries}"
        bad = unverified(await signing_secret(server), every)
        report_rate(rounds, set(original), len(every), bad)
    finally:
        await receiver.stop()


def report_latency(
    jobs: int,
    jobids: list[str],
    submitted: Calls,
    submit_seconds: float,
    complete: bool,
    arrivals: list[Arrival],
    states: Counter[str],
    tries: int,
) -> None:
    latency = Result(0.0)
    statuses: Counter[str] = Counter()
    for arrival in arrivals:
        record = json.loads(arrival.body)
        statuses[record["status"]] += 1
        latency.latencies.append(arrival.at - epoch(record["updated"]))
    ids = Counter(a.headers.get("webhook-id", "") for a in arrivals)
    print(f"1. Completion to arrival: {jobs} jobs from {SUBMITTERS} submitters")
    print(
        f"  POST /images: {submitted.shown()} in {submit_seconds:.2f} s "
        f"({len(jobids) / submit_seconds:.0f}/s)"
    )
    shown = ", ".join(f"{status} {count}" for status, count in sorted(statuses.items()))
    print(
        f"  arrived {len(arrivals)} of {len(jobids)} ({'all' if complete else 'NOT all'} within"
        f" 120 s), {len(ids)} distinct webhook-ids, records: {shown}"
    )
    listed = ", ".join(f"{status} {count}" for status, count in sorted(states.items()))
    print(f"  deliveries (latest per job): {listed}; tries in all: {tries}")
    if arrivals:
        spread = max(a.at for a in arrivals) - min(a.at for a in arrivals)
        gap = largest_gap([a.at for a in arrivals]) * 1000
        print(f"  arrivals spread over {spread:.2f} s, longest pause between two: {gap:.0f} ms")
    if latency.latencies:
        print(f"  {'latency ms':<12}{'p50':>9}{'p99':>9}{'max':>9}{'min':>9}")
        print(
            f"  {'':<12}{latency.percentile(0.5):>9.1f}{latency.percentile(0.99):>9.1f}"
            f"{max(latency.latencies) * 1000:>9.1f}{min(latency.latencies) * 1000:>9.1f}"
        )


def report_rate(rounds: list[Round], original: set[str], arrivals: int, bad: int) -> None:
    print("2. Deliveries per second: POST /images/<id>/webhooks for every job at once")
    print(
        f"  {'receiver':<18}{'arrived':>9}{'seconds':>9}{'per s':>8}{'calls s':>9}{'gap ms':>8}"
        f"  calls' statuses, webhook-ids"
    )
    for one in rounds:
        name = "answers at once" if not one.delay else f"answers in {one.delay * 1000:g} ms"
        same = "same as the first deliveries" if set(one.ids) == original else "DIFFERENT"
        repeated = sum(count - 1 for count in one.ids.values())
        print(
            f"  {name:<18}{one.arrived:>5}/{one.count:<3}{one.seconds:>9.2f}"
            f"{one.count / one.seconds:>8.0f}{one.calls_seconds:>9.2f}{one.gap * 1000:>8.0f}"
            f"  {one.calls.shown()}, "
            f"{len(one.ids)} distinct ({same}), {repeated} repeated"
        )
        print(f"    {one.after}")
        for problem in one.calls.errors:
            print(f"    ! {problem}")
    print(f"  signatures: {arrivals - bad} of {arrivals} arrivals verify")


# Part 3


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Window:
    name: str
    seconds: float
    cpu: float
    requests: Result
    statuses: Counter[int]


async def idle(pid: int, seconds: float) -> Window:
    before, started = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - started
    return Window("idle", elapsed, cpu_seconds(pid) - before, Result(elapsed), Counter())


async def clients(server: Server, jobid: str, seconds: float, wait: int | None) -> Window:
    """CLIENTS loops for `seconds`: GET ?wait=`wait`, or (None) GET and a 1 s sleep."""
    url = f"{server.url}{API}/images/{jobid}" + ("" if wait is None else f"?wait={wait}")
    connector = aiohttp.TCPConnector(limit=CLIENTS + 10)
    timeout = aiohttp.ClientTimeout(total=90)
    statuses: Counter[int] = Counter()
    pid = server.process.pid
    async with aiohttp.ClientSession(
        connector=connector, headers=server.auth, timeout=timeout
    ) as session:
        before, started = cpu_seconds(pid), time.perf_counter()
        until = started + seconds
        durations: list[float] = []

        async def client(index: int) -> None:
            await asyncio.sleep(index / CLIENTS)  # starts spread over the first second
            while (sent := time.perf_counter()) < until:
                async with session.get(url) as reply:
                    await reply.read()
                durations.append(time.perf_counter() - sent)
                statuses[reply.status] += 1
                if wait is None:
                    await asyncio.sleep(1.0)

        await asyncio.gather(*(client(index) for index in range(CLIENTS)))
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(pid) - before
    name = "poll (GET, 1 s sleep)" if wait is None else f"wait (GET ?wait={wait})"
    return Window(name, elapsed, cpu, Result(elapsed, durations), statuses)


async def waiting_part(server: Server, seconds: float) -> None:
    async with (
        aiohttp.ClientSession(headers=server.auth) as session,
        session.post(f"{server.url}{API}/images", json=BODY) as reply,
    ):
        jobid = str((await reply.json())["jobid"])
    pid = server.process.pid
    limit = resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]
    wait = min(60, max(1, int(seconds)))
    windows = [
        await idle(pid, IDLE_SECONDS),
        await clients(server, jobid, seconds, wait),
        await clients(server, jobid, seconds, None),
    ]
    print(
        f"3. Waiting vs polling: {CLIENTS} clients for {seconds:g} s each, one `admission` "
        f"server (a, then b), one unfinished job; server fd limit {limit}"
    )
    print(
        f"  {'mode':<22}{'window s':>9}{'requests':>9}{'CPU s':>8}{'CPU s/min':>10}"
        f"{'p50 ms':>9}{'max ms':>9}  statuses"
    )
    for one in windows:
        durations = one.requests.latencies
        p50 = f"{one.requests.percentile(0.5):>9.1f}" if durations else f"{'':>9}"
        top = f"{max(durations) * 1000:>9.1f}" if durations else f"{'':>9}"
        shown = ", ".join(f"{code}: {count}" for code, count in sorted(one.statuses.items()))
        print(
            f"  {one.name:<22}{one.seconds:>9.1f}{len(durations):>9}{one.cpu:>8.2f}"
            f"{one.cpu / one.seconds * 60:>10.2f}{p50}{top}  {shown}"
        )
    rest, waiting, polling = windows
    per_minute = {one.name: one.cpu / one.seconds * 60 for one in windows}
    ratio = per_minute[polling.name] / per_minute[waiting.name] if waiting.cpu else float("inf")
    base = per_minute[rest.name]
    above = (per_minute[polling.name] - base) / max(per_minute[waiting.name] - base, 1e-9)
    print(f"  poll/wait CPU: {ratio:.1f}x (above idle: {above:.1f}x)")


def raise_fd_limit(need: int) -> None:
    """At least `need` open files for this process and the servers it starts (inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        wanted = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def run(jobs: int, seconds: float, skip_wait: bool) -> None:
    os.environ["DREAMSERVE_WEBHOOK_ALLOW_PRIVATE"] = "true"
    raise_fd_limit(4 * CLIENTS)
    server_cpus = pin_servers()
    pinning = (
        f"servers on CPU {min(server_cpus)}, this process on the rest"
        if server_cpus
        else "no pinning"
    )
    print(f"{os.cpu_count()} CPUs, {pinning}")
    with tempfile.TemporaryDirectory() as scratch:
        real = Server("dreamserve", Path(scratch) / "dreamserve", server_cpus)
        try:
            await deliveries_part(real, jobs)
        finally:
            real.stop()
        if skip_wait:
            return
        held = Server("admission", Path(scratch) / "admission", server_cpus)
        try:
            await waiting_part(held, seconds)
        finally:
            held.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs of parts 1 and 2 (300)")
    parser.add_argument("--seconds", type=float, default=60.0, help="each window of part 3 (60)")
    parser.add_argument("--skip-wait", action="store_true", help="skip part 3")
    args = parser.parse_args()
    asyncio.run(run(args.jobs, args.seconds, args.skip_wait))


if __name__ == "__main__":
    main()
