"""Scale-out on PostgreSQL: workers, and API processes, in one run (issue 15's benchmark).

`workers`: the real commands, as the multi-process test starts them. A fresh PostgreSQL
database; one `dreamserve serve` with DREAMSERVE_RUN_JOBS=false (admits, runs nothing) and
`dreamserve worker --accounts LOCAL:wN` processes. Their engine only waits (bench/sleep_engine.py,
200 ms a job, no CPU), installed as an engine plugin (an entry point in a site folder on
PYTHONPATH); the catalogue model is 64x64 and the accounts LOCAL:w1 and LOCAL:w2, `slots` each,
come from the operator's configuration file (DREAMSERVE_CONFIG). Each round measures one worker
(LOCAL:w1's), then two (a second worker started for LOCAL:w2, stopped after): `slots` clients
per worker keep its account full, each submitting a job on it and waiting for its end
(`GET ?wait=30`), then the next. Jobs/s is the jobs that ended `completed` in the measured
seconds (after a warm-up); the figure is two workers' jobs/s over one's, paired by round.

`api`: the submission path on PostgreSQL against the no-op POST, with bench/api.py's servers,
load and table and bench/admission.py's three-account setup (imported):

  POST /noop                        the no-op FastAPI app
  1 process                         `admission` (jobs admitted, never run, no enqueue) on a
                                    fresh PostgreSQL database, 3 accounts: issue 15's target
  2 processes                       the same plus a second `admission` process on the same
                                    database; the clients split between the two
  1 process, procrastinate          `api` (RUN_JOBS=false): the job enqueued through
                                    procrastinate as in a deployment, on a second database

Servers are pinned to CPU 0 (both processes of `2 processes` too) and the clients to the
others; PostgreSQL is not pinned. The server CPU per submission (both processes' together for
`2 processes`) reads the cost without the machine's limits. `--baseline SRC` adds the
`1 process` case on another checkout's src/ (`git worktree add --detach DIR COMMIT`), for a
before/after in the same run.

The default of 4 slots per worker keeps a 2-core machine below its CPU: each job costs about
20 ms of CPU across the API process, the worker and the client (printed), so two workers of 10
slots (100 jobs/s) would need more than both cores, and measure the machine, not the dispatch.

    .venv/bin/python bench/scale.py [workers|api|all] [--rounds 3] [--seconds 5]
        [--slots 4] [--clients 8] [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
        [--baseline SRC]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp
from admission import POSTGRES, Admission, fresh_databases
from api import BODY, Result, Server, load, paired, pin_servers, process_cpu, table, verdict

HERE = Path(__file__).resolve().parent
DREAMSERVE = str(Path(sys.executable).with_name("dreamserve"))
ACCOUNTS = ("LOCAL:w1", "LOCAL:w2")
JOB = {"prompt": "waits", "model": "bench-wait", "count": 1}
CONFIG = """
[sizes.bench-wait.1k]
"1:1" = "64x64"

[[models]]
name = "bench-wait"
resolutions = ["1k"]
sizes = "bench-wait"
max_refs = 0
"""
TOKEN_LINE = "API token for user 1 (shown only now; keep it): "


class Process:
    """A `dreamserve` command in its own process group, its output collected; ready once a
    line contains `ready`."""

    def __init__(self, args: list[str], env: dict[str, str], ready: str) -> None:
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._wanted = ready
        self.process = subprocess.Popen(
            [DREAMSERVE, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(120):
            self.stop()
            raise RuntimeError(f"dreamserve {args[0]} did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if self._wanted in line:
                self._ready.set()

    def token(self) -> str:
        for line in self.lines:
            if TOKEN_LINE in line:
                return line.split(TOKEN_LINE)[1].split()[0]
        raise RuntimeError("the first start printed no token")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(60)


def plugin_site(root: Path) -> Path:
    """A site folder whose distribution declares bench/sleep_engine.py's engine as `sleep`."""
    info = root / "dreamserve_bench_sleep-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dreamserve-bench-sleep\n")
    (info / "entry_points.txt").write_text(
        "[dreamserve.engines]\nsleep = sleep_engine:SleepEngine\n"
    )
    return root


def total_cpu(pids: list[int]) -> float:
    """CPU seconds used by the processes `pids` and this one (the load client)."""
    return sum(process_cpu(pid) for pid in pids) + sum(os.times()[:2])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def keep_full(
    url: str, token: str, account: str, clients: int, warm: float, seconds: float
) -> Counter[str]:
    """`clients` loops, each submitting a job on `account` and waiting for its end, then the
    next; the end states of the jobs that ended in the measured `seconds` after `warm`."""
    ended: Counter[str] = Counter()
    start = time.monotonic() + warm
    until = start + seconds
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=clients * 2)
    async with aiohttp.ClientSession(f"{url}", headers=headers, connector=connector) as session:

        async def client() -> None:
            while time.monotonic() < until:
                body = {**JOB, "account": account}
                async with session.post("/v1/dreamina/images", json=body) as reply:
                    job = await reply.json()
                    if reply.status != 200:
                        ended[f"POST {reply.status}"] += 1
                        await asyncio.sleep(0.05)
                        continue
                status = job["status"]
                while status in ("created", "running"):
                    wait = f"/v1/dreamina/images/{job['jobid']}?wait=30"
                    async with session.get(wait) as reply:
                        status = (await reply.json())["status"]
                if start <= time.monotonic() < until:
                    ended[status] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return ended


async def workers(postgres: str, rounds: int, seconds: float, slots: int) -> None:
    with tempfile.TemporaryDirectory() as scratch, fresh_databases(postgres, 1) as urls:
        root = Path(scratch)
        site = plugin_site(root / "site")
        config = root / "dreamserve.toml"
        accounts = "".join(
            f'\n[[accounts]]\naccount = "{name}"\nengine = "sleep"\nmaxJobs = {slots}\n'
            for name in ACCOUNTS
        )
        config.write_text(CONFIG + accounts)
        env = {key: value for key, value in os.environ.items() if not key.startswith("DREAMSERVE")}
        path = os.pathsep.join([str(site), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        port = free_port()
        env |= {
            "PYTHONPATH": path,
            "DREAMSERVE_DATA_DIR": str(root / "data"),
            "DREAMSERVE_DATABASE_URL": urls[0],
            "DREAMSERVE_CONFIG": str(config),
            "DREAMSERVE_PORT": str(port),
            "DREAMSERVE_RUN_JOBS": "false",
            "DREAMSERVE_LOG_LEVEL": "info",  # the start lines waited for
            "DREAMSERVE_ACCESS_LOG": "false",
        }
        api = Process(["serve"], env, "Uvicorn running on")
        url = f"http://127.0.0.1:{port}"
        token = api.token()
        started = "worker started: runs the jobs of"
        first = Process(["worker", "--accounts", ACCOUNTS[0]], env, started)
        ratios: list[float] = []
        rates: dict[int, list[float]] = {1: [], 2: []}
        costs: dict[int, list[float]] = {1: [], 2: []}  # our processes' CPU ms per job
        states: Counter[str] = Counter()

        async def measured(processes: list[Process], accounts: tuple[str, ...]) -> Counter[str]:
            """Each account kept full at once; the end states, and the CPU per completed job
            of `processes` and of this client, recorded."""
            pids = [each.process.pid for each in processes]
            loop = asyncio.get_running_loop()
            # The CPU counted from the warm-up's end (2 s in), while the load is steady.
            before = loop.call_later(2.0, lambda: cpu.append(total_cpu(pids)))
            cpu: list[float] = []
            try:
                parts = await asyncio.gather(
                    *(keep_full(url, token, name, slots, 2.0, seconds) for name in accounts)
                )
            finally:
                before.cancel()
            ended = sum(parts, Counter())
            states.update(ended)
            used = total_cpu(pids) - cpu[0]  # measured a little past the window: an upper bound
            costs[len(accounts)].append(used / max(1, ended["completed"]) * 1000)
            rates[len(accounts)].append(ended["completed"] / seconds)
            return ended

        try:
            for _ in range(rounds):
                await measured([api, first], ACCOUNTS[:1])
                second = Process(["worker", "--accounts", ACCOUNTS[1]], env, started)
                try:
                    await measured([api, first, second], ACCOUNTS)
                finally:
                    second.stop()
                ratios.append(rates[2][-1] / rates[1][-1])
        finally:
            first.stop()
            api.stop()
    print(
        f"workers: {slots} slots each (one account per worker), 200 ms jobs, "
        f"{rounds} rounds of {seconds:g}s"
    )
    ideal = slots / 0.2
    for count, measured in rates.items():
        shown = ", ".join(f"{rate:.1f}" for rate in measured)
        print(
            f"{count} worker{'s' if count > 1 else ''}: median {statistics.median(measured):.1f} "
            f"jobs/s (rounds {shown}; {ideal * count:.0f} if nothing but the waits took time), "
            f"CPU per job {statistics.median(costs[count]):.1f} ms (API, workers and client)"
        )
    ratios.sort()
    median = statistics.median(ratios)
    print(f"end states: {dict(states)}")
    print(
        f"2 workers over 1: {median:.2f} (rounds {ratios[0]:.2f}-{ratios[-1]:.2f}) "
        f"{'meets' if median >= 1.9 else 'below'} the 1.90 target"
    )


def postgres_cpu() -> float:
    """CPU seconds used so far by this machine's PostgreSQL processes (every backend, the
    WAL writer, the checkpointer...), read from /proc; ended backends are not counted, so it
    is read around a phase in which no connection ends."""
    used = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().startswith("postgres"):
                used += process_cpu(int(entry.name))
        except (OSError, IndexError):  # ended meanwhile
            continue
    return used


async def split(servers: list[Server], url_path: str, clients: int, seconds: float) -> Result:
    """bench/api.py's `load` on each server at once, the clients split between them; one
    Result: every request, the servers' CPU together, and (read by the first load, over the
    same seconds) PostgreSQL's and this process's (the load client's) CPU."""
    meters = {"postgres": postgres_cpu, "client": lambda: sum(os.times()[:2])}
    parts = await asyncio.gather(
        *(
            load(
                "POST",
                f"{server.url}{url_path}",
                clients // len(servers),
                seconds,
                server.auth,
                BODY,
                server.process.pid,
                meters if server is servers[0] else None,
            )
            for server in servers
        )
    )
    merged = Result(seconds)
    merged.server_cpu = 0.0
    for part in parts:
        merged.latencies += part.latencies
        merged.statuses.update(part.statuses)
        merged.server_cpu += part.server_cpu or 0.0
    merged.metered = parts[0].metered
    return merged


async def api_processes(
    postgres: str, rounds: int, seconds: float, clients: int, baseline: str | None
) -> None:
    server_cpus = pin_servers()
    images = "/v1/dreamina/images"
    databases = fresh_databases(postgres, 3 if baseline else 2)
    with tempfile.TemporaryDirectory() as scratch, databases as urls:
        root = Path(scratch)
        noop = Server("noop", root / "noop", server_cpus)
        held = Admission("3 accounts", root / "held", server_cpus, urls[0])
        options = ["--no-shared", "--database-url", urls[0]]
        second = Server("admission", root / "held-2", server_cpus, options)
        enqueued = Admission("3 accounts", root / "api", server_cpus, urls[1], app="api")
        cases = [held, enqueued]
        if baseline:  # the same `admission` server on another checkout's src/
            ours = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = baseline
            try:
                cases.append(Admission("3 accounts", root / "before", server_cpus, urls[2]))
            finally:
                if ours is None:
                    del os.environ["PYTHONPATH"]
                else:
                    os.environ["PYTHONPATH"] = ours
        try:
            for each in cases:
                await each.setup()
            phases = {
                "POST /noop": ([noop], "/noop"),
                **({"PG 1 process, baseline": ([cases[2].server], images)} if baseline else {}),
                "PG 1 process": ([held.server], images),
                "PG 2 processes": ([held.server, second], images),
                "PG 1, procrastinate": ([enqueued.server], images),
            }
            results: dict[str, list[Result]] = {name: [] for name in phases}
            for _ in range(rounds):
                for name, (servers, path) in phases.items():
                    results[name].append(await split(servers, path, clients, seconds))
        finally:
            for server in (noop, second, *(case.server for case in cases)):
                server.stop()
    table(results, seconds, rounds, clients, server_cpus, 24)
    print("paired ratios, the median round:")
    verdict("PG 1 process (admitted)", paired(results, "PG 1 process", "POST /noop"), 0.35)
    verdict("PG 2 processes (admitted)", paired(results, "PG 2 processes", "POST /noop"), None)
    verdict("PG 1, enqueued too", paired(results, "PG 1, procrastinate", "POST /noop"), None)
    if baseline:
        before = paired(results, "PG 1 process, baseline", "POST /noop")
        verdict("PG 1 process, baseline src", before, None)
    two = paired(results, "PG 2 processes", "PG 1 process")
    spread = f"(rounds {two[0]:.2f}-{two[-1]:.2f})"
    print(f"{'2 processes over 1':<34}{statistics.median(two):6.2f} {spread}")
    ceilings(results)


def ceilings(results: dict[str, list[Result]]) -> None:
    """Where each request's CPU went (the median round of each part), and the most requests a
    second this machine's cores could serve at that cost: on a machine where the servers,
    PostgreSQL and the load client share the cores, that ceiling over the no-op's measured
    rate bounds the ratio any server could reach in this bench."""
    cores = len(os.sched_getaffinity(0) | {0})  # this process was moved off CPU 0
    noop = statistics.median(run.rate for run in results["POST /noop"])
    print(f"CPU per request, us (median round), and the ceiling of {cores} cores at that cost:")
    print(f"{'':<24}{'server':>8}{'postgres':>10}{'client':>8}{'total':>8}{'ceiling/s':>11}")
    for name, runs in results.items():
        parts = {
            "server": statistics.median(run.cpu_per_request or 0.0 for run in runs),
            **{
                what: statistics.median(
                    run.metered[what] / len(run.latencies) * 1e6 for run in runs
                )
                for what in ("postgres", "client")
            },
        }
        total = sum(parts.values())
        ceiling = cores / total * 1e6
        print(
            f"{name:<24}{parts['server']:>8.0f}{parts['postgres']:>10.0f}{parts['client']:>8.0f}"
            f"{total:>8.0f}{ceiling:>11.0f}  ({ceiling / noop:.2f} of the no-op's rate)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=["workers", "api", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--slots", type=int, default=4, help="each worker's account's maxJobs")
    parser.add_argument("--clients", type=int, default=8, help="API part: concurrent clients")
    parser.add_argument("--postgres", default=POSTGRES, metavar="URL")
    parser.add_argument(
        "--baseline",
        metavar="SRC",
        help="API part: also run the 1-process case on this src/ folder (another checkout)",
    )
    args = parser.parse_args()
    if args.part in ("workers", "all"):  # first: the API part pins this process to a CPU
        asyncio.run(workers(args.postgres, args.rounds, args.seconds, args.slots))
    if args.part in ("api", "all"):
        asyncio.run(
            api_processes(args.postgres, args.rounds, args.seconds, args.clients, args.baseline)
        )


if __name__ == "__main__":
    main()
