"""Packing quality on a synthetic catalog of 50 models of mixed sizes (seeded).

Each model gets the smallest fraction in {0.1, 0.125, 0.25, 0.5, 1} whose share of an
A100-80GB holds its estimated need; `zeroserve.plan.pack` places them on a pool of
A100-80GB cards. Reported: GPUs used against two lower bounds, total need / card memory
and total of the fractions, for first-fit decreasing (what `pack` runs) and for plain
first-fit in catalog order.

    .venv/bin/python bench/packing_quality.py [--no-write]

Writes the ``packing`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import random

from common import head_commit, machine, publish

from zeroserve.plan import GB, GPU, first_fit, pack

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
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    commit = head_commit()
    lines = [
        f"`bench/packing_quality.py`, commit {commit}; {machine()}.",
        "Synthetic catalogs of 50 models (30 % embedders, 20 % classifiers, 30 % 1-3B, 15 % 7-8B, 5 % 13-14B",
        "LLMs, needs drawn per kind, seeded), each at the smallest fraction in {0.1, 0.125, 0.25, 0.5, 1}",
        "that holds it on an A100-80GB.",
        "",
        "| seed | total need / card (bound) | total fractions (bound) | pack (FFD) GPUs | plain first-fit GPUs |",
        "| --- | --- | --- | --- | --- |",
    ]
    at_bound = 0
    for seed in range(5):
        items = catalog(50, seed)
        gpus = [GPU(f"g{i}", "A100-80GB", int(CARD)) for i in range(60)]
        by_need = math.ceil(sum(i[2] for i in items) / CARD)
        by_fraction = math.ceil(sum(i[1] for i in items) - 1e-9)
        packed, plain = pack(items, gpus), first_fit(items, gpus)
        assert packed.ok and plain.ok
        at_bound += packed.gpus_used == by_fraction
        lines.append(f"| {seed} | {by_need} | {by_fraction} | {packed.gpus_used} | {plain.gpus_used} |")
    lines += [
        "",
        f"The packer reaches the fractions' lower bound on {at_bound} of 5 catalogs; the remaining gap to the",
        'memory bound is the price of coarse fractions, which the plan\'s "a smaller fraction would do"',
        "warnings point at.",
    ]
    publish("packing", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
