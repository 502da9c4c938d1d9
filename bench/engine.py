"""What dreamserve adds to a diffusers model's own time, and what batching a job's images saves.

The tiny random Stable Diffusion pipeline of the tests (tests/tiny_pipeline.py) is written to a
temporary directory. `dreamserve serve` starts as a subprocess, exactly as `make run` would, with
a config file (DREAMSERVE_CONFIG) that declares a `tiny-256` model (256x256) and a shared
diffusers account on the CPU. In this process the same pipeline is loaded with the same
auto-pipeline class and called with the same settings (steps, guidance 0, size, one seeded CPU
generator per image).

1. Overhead. Rounds alternate: a direct pipeline call, then a job through the server (POST
   /images, then GET /images/<jobid>?wait=60 until it ends: submit to completed, nothing taken
   off). After one warm-up each (the server loads the model on its first job), `--rounds`
   rounds for count 1 and for count 4. Prints the medians and the overhead: server / direct - 1
   (target: at most 5 %), and the difference in milliseconds (what a job pays whatever its
   length: HTTP, admission, the database, encoding and storing the images). Also the median
   of each round's own difference (job - call, measured a second apart), which a slow spell of
   the machine moves less than the difference of the medians.
2. Batching. Direct calls only: 4 images in one call (num_images_per_prompt=4) against 4 calls
   of one image, alternating, medians and their ratio.

Only one of the two processes computes at a time (each waits for the other), and each measure
starts after a pause of `SETTLE` seconds, so they do not share the CPU.

    .venv/bin/python bench/engine.py [--rounds 10] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_pipeline import build_tiny_pipeline  # noqa: E402

SIZE = 256
# A pause before each measure: torch's worker threads spin for a while after their last work,
# and those of the process that just ran would otherwise take CPU from the one measured next.
SETTLE = 0.5
CONFIG = """
[sizes.tiny-256.1k]
"1:1" = "{size}x{size}"

[[models]]
name = "tiny-256"
resolutions = ["1k"]
sizes = "tiny-256"
max_refs = 1
auto_ratio = false

[[accounts]]
account = "LOCAL:cpu"
engine = "diffusers"
maxJobs = 1
settings = {{ model = "{model}", models = ["tiny-256"], device = "cpu", steps = {steps}, \
maxPixels = {pixels} }}
"""
PROMPT = "a lighthouse on a cliff at dawn, oil painting"


class Server:
    """`dreamserve serve` on a fresh data dir, its output read until uvicorn listens."""

    def __init__(self, data_dir: Path, config: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {key: value for key, value in os.environ.items() if not key.startswith("DREAMSERVE")}
        env |= {
            "DREAMSERVE_DATA_DIR": str(data_dir),
            "DREAMSERVE_PORT": str(port),
            "DREAMSERVE_CONFIG": str(config),
            "DREAMSERVE_ACCESS_LOG": "false",
        }
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "dreamserve"), "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.append(line)
                if "Uvicorn running on" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        found = re.search(
            r"API token for user 1 \(shown only now; keep it\): (\S+)", "".join(self.lines)
        )
        assert found is not None
        self.token = found.group(1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def job_through(client: httpx.Client, count: int, seed: int) -> float:
    """Seconds from the POST to the completed record."""
    body = {
        "prompt": PROMPT,
        "model": "tiny-256",
        "ratio": "1:1",
        "count": count,
        "seed": seed,
        "account": "LOCAL:cpu",  # not the built-in procedural account, which serves every model
    }
    started = time.perf_counter()
    created = client.post("/v1/dreamina/images", json=body)
    created.raise_for_status()
    jobid = created.json()["jobid"]
    while True:
        record = client.get(f"/v1/dreamina/images/{jobid}", params={"wait": 60}).json()
        if record["status"] != "created":
            break
    elapsed = time.perf_counter() - started
    if record["status"] != "completed":
        raise RuntimeError(f"job failed: {record}")
    return elapsed


def direct(pipeline: Any, steps: int, count: int, seed: int) -> float:
    import torch

    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
    started = time.perf_counter()
    with torch.inference_mode():
        images = pipeline(
            prompt=PROMPT,
            num_images_per_prompt=count,
            width=SIZE,
            height=SIZE,
            num_inference_steps=steps,
            guidance_scale=0.0,
            generator=generators,
            output_type="pil",
        ).images
    elapsed = time.perf_counter() - started
    assert len(images) == count
    return elapsed


def alternate(
    rounds: int, first: Callable[[int], float], second: Callable[[int], float]
) -> tuple[list[float], list[float]]:
    a: list[float] = []
    b: list[float] = []
    for round_ in range(rounds):
        time.sleep(SETTLE)
        a.append(first(round_))
        time.sleep(SETTLE)
        b.append(second(round_))
    return a, b


def show(label: str, times: list[float]) -> float:
    median = statistics.median(times)
    spread = ", ".join(f"{t * 1000:.0f}" for t in times)
    print(f"  {label:<34} median {median * 1000:8.1f} ms   [{spread}]")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import diffusers
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "tiny-sd"
        build_tiny_pipeline(model)
        config = Path(scratch) / "dreamserve.toml"
        config.write_text(
            CONFIG.format(size=SIZE, model=model, steps=args.steps, pixels=SIZE * SIZE)
        )
        pipeline = diffusers.AutoPipelineForText2Image.from_pretrained(
            str(model), dtype=torch.float32
        )
        pipeline.set_progress_bar_config(disable=True)
        pipeline = pipeline.to("cpu")
        print(
            f"tiny SD pipeline, {SIZE}x{SIZE}, {args.steps} steps, CPU, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {args.rounds} rounds"
        )

        server = Server(Path(scratch) / "data", config)
        try:
            headers = {"Authorization": f"Bearer {server.token}"}
            with httpx.Client(base_url=server.url, headers=headers, timeout=120) as client:
                job_through(client, 1, 0)  # the server loads the model
                direct(pipeline, args.steps, 1, 0)
                print("\n1. a job through dreamserve (submit to completed) vs the pipeline call")
                for count in (1, 4):
                    calls, jobs = alternate(
                        args.rounds,
                        lambda r, count=count: direct(pipeline, args.steps, count, r),
                        lambda r, count=count: job_through(client, count, r),
                    )
                    base = show(f"count {count}: direct pipeline call", calls)
                    through = show(f"count {count}: job through dreamserve", jobs)
                    paired = statistics.median(j - c for j, c in zip(jobs, calls, strict=True))
                    print(
                        f"  count {count}: overhead {(through / base - 1) * 100:+.1f} % "
                        f"({(through - base) * 1000:+.0f} ms); median of the rounds' own "
                        f"differences {paired * 1000:+.0f} ms ({paired / base * 100:+.1f} %)\n"
                    )
        finally:
            server.stop()

        print("2. batching: 4 images in one call vs 4 calls of one image (direct)")
        batched, single = alternate(
            args.rounds,
            lambda r: direct(pipeline, args.steps, 4, r),
            lambda r: sum(direct(pipeline, args.steps, 1, r * 4 + i) for i in range(4)),
        )
        one = show("one call of 4 images", batched)
        four = show("4 calls of 1 image", single)
        print(
            f"  one call takes {one / four:.2f} of the time of 4 calls ({four / one:.2f}x faster)"
        )


if __name__ == "__main__":
    main()
