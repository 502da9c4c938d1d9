"""The server's memory under a burst of small jobs: peak RSS against the idle server.

Starts the real server (`dreamserve serve`, as the README does) as a subprocess for each variant,
in a fresh data dir, with a configuration file that serves a 512x512 model on ten procedural
accounts of 50 slots each (caps high enough to admit the whole burst), PNG images, and
`DREAMSERVE_RENDER_MEMORY_MB` set to the variant's budget. Submits `--jobs` jobs of 4 images
each (PNG, zlib level 1) as fast as `--clients` clients can, waits until all have ended, and
reads the server's idle RSS (VmRSS once it answers), its peak (VmHWM, the kernel's
high-water mark) and the CPU time it spent on the burst (steadier than wall time on a shared
machine).

    .venv/bin/python bench/burst.py [--jobs 300] [--budgets 1024,1000000] [--src LABEL=DIR]...

A budget larger than the burst (1000000 MiB) is the runner without a budget; each `--src` adds
a variant run on another checkout's `src` directory with the default budget, e.g. the commit
before the budget existed (`git worktree add --detach /tmp/old COMMIT`, then
`--src before=/tmp/old/src`). Growth ratios are against the first variant.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

SRC = Path(__file__).resolve().parents[1] / "src"
ACCOUNTS = 10
CONFIG = """
[sizes.burst.1k]
"1:1" = "512x512"

[[models]]
name = "burst-512"
resolutions = ["1k"]
sizes = "burst"
max_refs = 0
""" + "".join(
    f'\n[[accounts]]\naccount = "LOCAL:burst{n}"\nengine = "procedural"\nmaxJobs = 50\n'
    'models = ["burst-512"]\n'
    for n in range(ACCOUNTS)
)
BODY = {"prompt": "a burst of small pictures", "model": "burst-512", "ratio": "1:1", "count": 4}
TOKEN = re.compile(r"API token for user 1 \(shown only now; keep it\): (\S+)")


@dataclass
class Result:
    variant: str
    idle_mib: float
    peak_mib: float
    seconds: float
    cpu_seconds: float
    completed: int

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.idle_mib


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int, field: str) -> float:
    """VmRSS or VmHWM of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


async def submit_all(url: str, token: str, jobs: int, clients: int) -> list[str]:
    headers = {"Authorization": f"Bearer {token}"}
    jobids: list[str] = []
    left = iter(range(jobs))

    async def client(http: httpx.AsyncClient) -> None:
        for _ in left:
            reply = await http.post("/v1/dreamina/images", json=BODY, headers=headers)
            reply.raise_for_status()
            jobids.append(reply.json()["jobid"])

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return jobids


async def wait_all(url: str, token: str, jobids: list[str]) -> int:
    """Wait for every job to end (`?wait=`); how many completed."""
    headers = {"Authorization": f"Bearer {token}"}
    completed = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for jobid in jobids:
            while True:
                reply = await http.get(f"/v1/dreamina/images/{jobid}?wait=20", headers=headers)
                reply.raise_for_status()
                status = reply.json()["status"]
                if status != "created":
                    completed += status == "completed"
                    break
    return completed


def start(data_dir: Path, port: int, budget: int, src: Path) -> subprocess.Popen[str]:
    config = data_dir.parent / "burst.toml"
    config.write_text(CONFIG)
    env = {key: value for key, value in os.environ.items() if not key.startswith("DREAMSERVE_")}
    env |= {
        "PYTHONPATH": str(src),
        "DREAMSERVE_DATA_DIR": str(data_dir),
        "DREAMSERVE_PORT": str(port),
        "DREAMSERVE_CONFIG": str(config),
        "DREAMSERVE_IMAGE_FORMAT": "png",
        "DREAMSERVE_PNG_COMPRESS_LEVEL": "1",  # the burst's CPU is rendering, not zlib
        "DREAMSERVE_RENDER_MEMORY_MB": str(budget),
        "DREAMSERVE_ACCESS_LOG": "false",
        "DREAMSERVE_LOG_LEVEL": "warning",
    }
    command = "import sys; from dreamserve.cli import main; sys.exit(main(['serve']))"
    return subprocess.Popen(
        [sys.executable, "-c", command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_token(server: subprocess.Popen[str]) -> str:
    """The token of the first start's banner; the rest of the output is drained (and shown)."""
    stdout = server.stdout
    assert stdout is not None
    for line in stdout:
        found = TOKEN.search(line)
        if found:
            threading.Thread(target=_show_problems, args=(stdout,), daemon=True).start()
            return found.group(1)
    raise RuntimeError("the server ended without printing its token")


def _show_problems(stdout: IO[str]) -> None:
    for line in stdout:
        if " WARNING " in line or " ERROR " in line or "Traceback" in line:
            print(line, end="", file=sys.stderr)


def wait_ready(url: str, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the server ended while starting")
        try:
            if httpx.get(f"{url}/v1/dreamina/models", timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the server did not answer within a minute")


def run(variant: str, budget: int, src: Path, jobs: int, clients: int) -> Result:
    with tempfile.TemporaryDirectory() as scratch:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start(Path(scratch) / "data", port, budget, src)
        try:
            token = read_token(server)
            wait_ready(url, server)
            time.sleep(1)  # the start's allocations settle
            idle = memory_mib(server.pid, "VmRSS")
            began, began_cpu = time.perf_counter(), cpu_seconds(server.pid)
            jobids = asyncio.run(submit_all(url, token, jobs, clients))
            completed = asyncio.run(wait_all(url, token, jobids))
            seconds = time.perf_counter() - began
            cpu = cpu_seconds(server.pid) - began_cpu
            peak = memory_mib(server.pid, "VmHWM")
        finally:
            server.terminate()
            server.wait(30)
    return Result(variant, idle, peak, seconds, cpu, completed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--budgets", default="1024,1000000", help="MiB, comma-separated")
    parser.add_argument("--src", action="append", default=[], help="LABEL=another src dir")
    args = parser.parse_args()
    variants = [(f"budget {mib} MiB", int(mib), SRC) for mib in args.budgets.split(",")]
    for other in args.src:
        label, _, directory = other.partition("=")
        variants.append((label, 1024, Path(directory).resolve()))
    print(f"{args.jobs} jobs x 4 PNG 512x512, {args.clients} clients, {os.cpu_count()} CPUs\n")
    columns = "idle RSS MiB | peak RSS MiB | growth MiB | seconds | server CPU s | completed"
    print(f"| variant | {columns} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    results = []
    for variant, budget, src in variants:
        result = run(variant, budget, src, args.jobs, args.clients)
        results.append(result)
        print(
            f"| {variant} | {result.idle_mib:.0f} | {result.peak_mib:.0f} | "
            f"{result.growth_mib:.0f} | {result.seconds:.1f} | {result.cpu_seconds:.1f} | "
            f"{result.completed} |",
            flush=True,
        )
    first = results[0]
    for other in results[1:]:
        ratio = other.growth_mib / max(first.growth_mib, 1.0)
        print(f"\ngrowth of '{other.variant}' / '{first.variant}': {ratio:.1f}x")


if __name__ == "__main__":
    main()
