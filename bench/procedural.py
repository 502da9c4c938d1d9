"""CPU per image of the procedural engine: the composition computed at the full size (as before
issue 13: the baseline, in this same process) against `render` as it runs (a coarse grid of at
most COMPOSITION_PIXELS, resampled to the full size in stripes), and the JPEG encode.

Each figure is the median of `--rounds` rounds of CPU time (time.process_time, one thread), the
two variants alternating round by round. The target: a 2k image (2560x1440) costs <= 100 ms.

    .venv/bin/python bench/procedural.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from dreamserve.engines.base import CancelSignal, GenerationRequest
from dreamserve.engines.procedural import _Scene, render

PROMPT = "A stunning aurora borealis over a frozen lake at midnight"
SIZES = [(1024, 1024), (2560, 1440), (6197, 2656)]


def full_size(request: GenerationRequest) -> Image.Image:
    """The composition evaluated at every pixel of the output (the engine before issue 13)."""
    scene = _Scene.from_request(request, 0)
    colour = scene.colour(request.width, request.height, 0, request.height)
    return Image.fromarray(np.clip(colour * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


def coarse(request: GenerationRequest) -> Image.Image:
    return render(request, 0, None, lambda _: None, CancelSignal())


def cpu_ms(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return (time.process_time() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    print(f"{'size':>10} {'full-size ms':>13} {'render ms':>10} {'ratio':>7} {'jpeg ms':>8}")
    for width, height in SIZES:
        request = GenerationRequest(PROMPT, "seedream-4.0", width, height, 1)
        before, after, encode = [], [], []
        coarse(request)  # warm-up
        for _ in range(rounds):
            before.append(cpu_ms(lambda: full_size(request)))  # noqa: B023
            image = coarse(request)
            after.append(cpu_ms(lambda: coarse(request)))  # noqa: B023
            encode.append(cpu_ms(lambda: image.save(io.BytesIO(), "JPEG", quality=90)))  # noqa: B023
        b, a, e = (statistics.median(x) for x in (before, after, encode))
        print(f"{width}x{height:<5} {b:13.0f} {a:10.1f} {a / b:7.3f} {e:8.1f}")


if __name__ == "__main__":
    main()
