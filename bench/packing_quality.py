"""Packing quality on a synthetic catalog of 50 models of mixed sizes (seeded).

Each model gets the smallest fraction in {0.1, 0.125, 0.25, 0.5, 1} whose share of an
A100-80GB holds its estimated need; `zeroserve.plan.pack` places them on a pool of
A100-80GB cards. Reported: GPUs used against two lower bounds, total need / card memory
and total of the fractions, for first-fit decreasing (what `pack` runs) and for plain
first-fit in catalog order.

    .venv/bin/python bench/packing_quality.py
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from zeroserve.plan import GB, GPU, first_fit, pack  # noqa: E402

FRACTIONS = (0.1, 0.125, 0.25, 0.5, 1.0)
CARD = 80 * GB
# (kind, need range in GB incl. KV cache and context, share of the catalog)
KINDS = [
    ("embedder", (1.4, 2.5), 0.3),
    ("classifier", (1.4, 3.0), 0.2),
    ("llm-1-3B", (5, 18), 0.3),
    ("llm-7-8B", (20, 38), 0.15),
    ("llm-13-14B", (42, 75), 0.05),
]


def catalog(n: int, seed: int) -> list[tuple[str, float, int]]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        kind, (lo, hi), _ = rng.choices(KINDS, weights=[k[2] for k in KINDS])[0]
        need = rng.uniform(lo, hi) * GB
        fraction = next(f for f in FRACTIONS if need <= f * CARD)
        items.append((f"{kind}-{i}", fraction, int(need)))
    return items


def main() -> None:
    print(f"{time.strftime('%Y-%m-%d')}, 50 models per catalog, A100-80GB cards")
    print("| seed | total need / card (bound) | total fractions (bound) | pack (FFD) GPUs | plain first-fit GPUs |")
    print("| --- | --- | --- | --- | --- |")
    for seed in range(5):
        items = catalog(50, seed)
        gpus = [GPU(f"g{i}", "A100-80GB", int(CARD)) for i in range(60)]
        by_need = math.ceil(sum(i[2] for i in items) / CARD)
        by_fraction = math.ceil(sum(i[1] for i in items) - 1e-9)
        packed, plain = pack(items, gpus), first_fit(items, gpus)
        assert packed.ok and plain.ok
        print(f"| {seed} | {by_need} | {by_fraction} | {packed.gpus_used} | {plain.gpus_used} |")


if __name__ == "__main__":
    main()
