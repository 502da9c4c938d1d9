"""The procedural upscale's time and peak memory: striped (as it runs) against one whole image.

Each variant runs in a fresh process (peak RSS only grows), from a 5404x3040 source (4k 16:9)
to 8k (10808x6080) with the default strengths. Prints seconds and the peak RSS growth.

    .venv/bin/python bench/upscale.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
from PIL import Image
import dreamserve.engines.procedural as procedural
from dreamserve.engines.base import CancelSignal, UpscaleRequest

if sys.argv[1] == "whole":
    procedural.UPSCALE_STRIPE_ROWS = 1 << 30
rng = np.random.default_rng(0)
source = Image.fromarray(rng.integers(0, 255, (3040, 5404, 3), dtype=np.uint8))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
request = UpscaleRequest(source, 10808, 6080, 0.65, 0.5)
procedural.resample(request, lambda fraction: None, CancelSignal())
seconds = time.perf_counter() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"seconds": seconds, "mib": grown}))
"""


def run(variant: str) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, "-c", CHILD, variant], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, float] = json.loads(output)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    print("| variant | seconds (median) | peak RSS growth MiB (median) |\n|---|---:|---:|")
    for variant in ("striped", "whole"):
        results = [run(variant) for _ in range(rounds)]
        seconds = statistics.median(each["seconds"] for each in results)
        mib = statistics.median(each["mib"] for each in results)
        print(f"| {variant} | {seconds:.1f} | {mib:.0f} |")


if __name__ == "__main__":
    main()
