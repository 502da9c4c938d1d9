"""API throughput and latency against a no-op FastAPI baseline, in one run.

Starts three uvicorn servers with the settings `dreamserve serve` uses (bench/serve.py): the real
app (`dreamserve`, jobs run: 64x64 procedural images), the real app with jobs admitted but never
run (`admission`: the submission path alone), and a no-op FastAPI app. Eight concurrent clients
(aiohttp, one keep-alive connection each) drive each endpoint in turn, for several rounds:

  POST /noop                          parses the JSON body, answers a small JSON
  POST /images      (dreamserve)      the seed-shaped body, count 1: admitted and run
  POST /images      (admission)       the same body: admitted, left `created`
  GET  /noop/<id>                     answers a constant
  GET  /images/<id> (dreamserve)      a completed job of 4 images (served from memory)
  GET  /images/<id> (admission)       an unfinished job (kept in memory until it changes)

It prints, per endpoint, requests/s, p50/p99 latency of the median round, the median of the
server's CPU per request (its own cost, whether or not it was the bottleneck) and the status
counts (429s apart); then each target's ratio: ours over the no-op's in each round, whose median
is the figure (the two sides of a round run seconds apart, so a slow spell of a shared machine
moves both). Servers are pinned to CPU 0 and the clients to the other CPUs where the machine has
two or more.

The `admission` server logs at info (each admission is one event line, observe.py), to a file.
`--baseline SRC` adds a fourth server, the same `admission` server on another checkout's
`SRC/src` (e.g. a worktree of the commit before a change: `git worktree add --detach
/tmp/before <commit>`), driven in the same rounds: its figure is the paired ratio of ours over
it, in req/s and in server CPU per request.

    .venv/bin/python bench/api.py [--seconds 5] [--rounds 5] [--clients 8] [--baseline SRC]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
BODY = {
    "prompt": "A stunning aurora borealis over a frozen lake at midnight",
    "model": "bench-tiny",
    "ratio": "1:1",
    "resolution": "1k",
    "count": 1,
}


@dataclass
class Result:
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    server_cpu: float | None = None  # CPU seconds the server process used while measured
    # What each of `load`'s `meters` read over the measured seconds (CPU seconds of others).
    metered: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def cpu_per_request(self) -> float | None:
        """The server's CPU microseconds per request: its cost, whoever is the bottleneck."""
        if self.server_cpu is None or not self.latencies:
            return None
        return self.server_cpu / len(self.latencies) * 1e6

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


class Server:
    def __init__(
        self,
        app: str,
        data_dir: Path,
        cpus: set[int] | None,
        options: Sequence[str] = (),
        src: str | None = None,
    ) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.data_dir = data_dir
        command = [sys.executable, str(HERE / "serve.py"), app, "--port", str(self.port)]
        env = dict(os.environ)
        if src is not None:  # another checkout's dreamserve (`--baseline`)
            env["PYTHONPATH"] = os.pathsep.join([src, *env.get("PYTHONPATH", "").split(os.pathsep)])
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log = (data_dir / "server.log").open("w")
        self.process = subprocess.Popen(
            [*command, "--data-dir", str(data_dir), *options],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        assert self.process.stdout is not None
        self.token = self.process.stdout.readline().strip()
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{app} server did not start: see {data_dir / 'server.log'}")

    def unfinished(self) -> int:
        with sqlite3.connect(self.data_dir / "dreamserve.db") as db:
            return int(db.execute("SELECT coalesce(sum(running), 0) FROM accounts").fetchone()[0])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.log.close()


def process_cpu(pid: int) -> float:
    """CPU seconds (user and system) a process has used, all its threads together."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    method: str,
    url: str,
    clients: int,
    seconds: float,
    headers: dict[str, str],
    body: dict | None,
    pid: int | None = None,
    meters: Mapping[str, Callable[[], float]] | None = None,
) -> Result:
    """`clients` loops, each sending its next request when the last answered; with `pid`,
    the CPU that server process used meanwhile (after the warm-up), and what each of
    `meters` (a function that reads a CPU total) read over the same seconds."""
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        warm_until = time.perf_counter() + 1.0
        result = Result(seconds)

        async def client(until: float, record: bool) -> None:
            while (started := time.perf_counter()) < until:
                async with session.request(method, url, json=body) as reply:
                    await reply.read()
                if record:
                    result.latencies.append(time.perf_counter() - started)
                    result.statuses[reply.status] += 1

        await asyncio.gather(*(client(warm_until, False) for _ in range(clients)))
        meters = meters or {}
        before = {name: meter() for name, meter in meters.items()}
        cpu = process_cpu(pid) if pid is not None else None
        until = time.perf_counter() + seconds
        await asyncio.gather(*(client(until, True) for _ in range(clients)))
        if pid is not None and cpu is not None:
            result.server_cpu = process_cpu(pid) - cpu
        result.metered = {name: meter() - before[name] for name, meter in meters.items()}
        return result


async def unfinished_job(server: Server) -> str:
    url = f"{server.url}/v1/dreamina/images"
    async with (
        aiohttp.ClientSession(headers=server.auth) as session,
        session.post(url, json=BODY) as reply,
    ):
        return str((await reply.json())["jobid"])


async def completed_job(server: Server) -> str:
    async with aiohttp.ClientSession(headers=server.auth) as session:
        async with session.post(f"{server.url}/v1/dreamina/images", json={**BODY, "count": 4}) as r:
            jobid = (await r.json())["jobid"]
        while True:
            async with session.get(f"{server.url}/v1/dreamina/images/{jobid}") as reply:
                if (await reply.json())["status"] == "completed":
                    return str(jobid)
            await asyncio.sleep(0.05)


async def drain(server: Server) -> None:
    """Wait for the jobs a POST round left running, so the next round starts quiet."""
    for _ in range(3000):  # at most five minutes
        if not server.unfinished():
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("jobs did not drain")


async def run(seconds: float, rounds: int, clients: int, baseline: str | None) -> None:
    server_cpus = pin_servers()
    info = ["--log-level", "info"]
    with tempfile.TemporaryDirectory() as scratch:
        servers = {
            "dreamserve": Server("dreamserve", Path(scratch) / "dreamserve", server_cpus),
            "admission": Server("admission", Path(scratch) / "admission", server_cpus, info),
            "noop": Server("noop", Path(scratch) / "noop", server_cpus),
        }
        if baseline:
            held_before = Server("admission", Path(scratch) / "before", server_cpus, info, baseline)
            servers["before"] = held_before
        real, held, noop = servers["dreamserve"], servers["admission"], servers["noop"]
        try:
            jobid = await completed_job(real)
            waiting = await unfinished_job(held)
            before = servers.get("before")
            phases = {
                "POST /noop": (noop, "POST", f"{noop.url}/noop", BODY),
                "POST /images run": (real, "POST", f"{real.url}/v1/dreamina/images", BODY),
                "POST /images held": (held, "POST", f"{held.url}/v1/dreamina/images", BODY),
                "GET /noop/<id>": (noop, "GET", f"{noop.url}/noop/{jobid}", None),
                "GET /images done": (real, "GET", f"{real.url}/v1/dreamina/images/{jobid}", None),
                "GET /images open": (
                    held,
                    "GET",
                    f"{held.url}/v1/dreamina/images/{waiting}",
                    None,
                ),
            }
            if before is not None:
                url = f"{before.url}/v1/dreamina/images"
                phases["POST /images before"] = (before, "POST", url, BODY)
            results: dict[str, list[Result]] = {name: [] for name in phases}
            for _ in range(rounds):
                for name, (server, method, url, body) in phases.items():
                    headers = server.auth if server is not noop else {}
                    measured = await load(
                        method, url, clients, seconds, headers, body, server.process.pid
                    )
                    results[name].append(measured)
                    await drain(real)
        finally:
            for server in servers.values():
                server.stop()
    report(results, seconds, rounds, clients, server_cpus)
    if baseline:
        against_baseline(results, baseline)


def against_baseline(results: dict[str, list[Result]], baseline: str) -> None:
    """The submission path of this checkout over the same of `baseline`, round by round: in
    req/s, and in server CPU per request (steadier on a shared machine)."""
    ours, theirs = results["POST /images held"], results["POST /images before"]
    rates = sorted(mine.rate / base.rate for mine, base in zip(ours, theirs, strict=True))
    costs = sorted(
        mine_cpu / base_cpu
        for mine, base in zip(ours, theirs, strict=True)
        if (mine_cpu := mine.cpu_per_request) and (base_cpu := base.cpu_per_request)
    )
    print(f"the submission path against {baseline} (paired rounds):")
    print(
        f"  req/s {statistics.median(rates):.3f} of the baseline's "
        f"(rounds {rates[0]:.3f}-{rates[-1]:.3f})"
    )
    if costs:
        print(
            f"  server CPU per request {statistics.median(costs):.3f} of the baseline's "
            f"(rounds {costs[0]:.3f}-{costs[-1]:.3f})"
        )
    print(f"  load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def pin_servers() -> set[int] | None:
    """The CPUs for the servers (CPU 0), this process moved to the others; None (no pinning)
    on a machine with one CPU."""
    cpus = os.sched_getaffinity(0)
    server_cpus = {min(cpus)} if len(cpus) >= 2 else None
    if server_cpus:
        os.sched_setaffinity(0, cpus - server_cpus)
    return server_cpus


def table(
    results: dict[str, list[Result]],
    seconds: float,
    rounds: int,
    clients: int,
    server_cpus: set[int] | None,
    width: int = 20,
) -> dict[str, float]:
    """Print the median round of each endpoint (status counts of all rounds) and the median
    of the server's CPU per request; its req/s."""
    pinning = (
        f"servers on CPU {min(server_cpus)}, clients on the rest" if server_cpus else "no pinning"
    )
    print(f"{clients} clients, {rounds} rounds of {seconds:g}s per endpoint, {pinning}")
    print(
        f"{'endpoint':<{width}}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'cpu us':>8}"
        "  statuses (all rounds)"
    )
    rate: dict[str, float] = {}
    for name, runs in results.items():
        median = sorted(runs, key=lambda r: r.rate)[len(runs) // 2]
        rate[name] = median.rate
        costs = [cost for one in runs if (cost := one.cpu_per_request) is not None]
        cost = f"{statistics.median(costs):>8.0f}" if costs else f"{'-':>8}"
        statuses: Counter[int] = Counter()
        for one in runs:
            statuses.update(one.statuses)
        shown = ", ".join(f"{code}: {count}" for code, count in sorted(statuses.items()))
        print(
            f"{name:<{width}}{median.rate:>8.0f}{median.percentile(0.5):>9.2f}"
            f"{median.percentile(0.99):>9.2f}{cost}  {shown}"
        )
    return rate


def paired(results: dict[str, list[Result]], ours: str, baseline: str) -> list[float]:
    """Our rate over the baseline's in each round (the two measured a few seconds apart), in
    order: a slow spell of a shared machine moves both sides of a round, not their ratio."""
    return sorted(
        mine.rate / theirs.rate
        for mine, theirs in zip(results[ours], results[baseline], strict=True)
    )


def verdict(what: str, ratios: list[float], target: float | None, width: int = 34) -> None:
    """One line: the median of the paired ratios, their range, and how it stands to `target`."""
    median = statistics.median(ratios)
    spread = f"(rounds {ratios[0]:.2f}-{ratios[-1]:.2f})"
    stands = "" if target is None else (" meets" if median >= target else " below")
    goal = "" if target is None else f" the {target:.2f} target"
    print(f"{what:<{width}}{median:6.2f} of the no-op {spread}{stands}{goal}")


def report(
    results: dict[str, list[Result]],
    seconds: float,
    rounds: int,
    clients: int,
    server_cpus: set[int] | None,
) -> None:
    table(results, seconds, rounds, clients, server_cpus)
    print("paired ratios, the median round:")
    lines = [
        ("POST /images held", "POST /noop", 0.50, "submissions (the submission path)"),
        ("GET /images done", "GET /noop/<id>", 0.70, "GET of a finished job"),
        ("GET /images open", "GET /noop/<id>", 0.70, "GET of an unfinished job"),
        ("POST /images run", "POST /noop", None, "submissions, jobs run on that core"),
    ]
    for ours, baseline, target, what in lines:
        verdict(what, paired(results, ours, baseline), target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--baseline", metavar="SRC", help="a checkout whose src/ runs the baseline server"
    )
    args = parser.parse_args()
    src = str(Path(args.baseline).resolve() / "src") if args.baseline else None
    asyncio.run(run(args.seconds, args.rounds, args.clients, src))


if __name__ == "__main__":
    main()
