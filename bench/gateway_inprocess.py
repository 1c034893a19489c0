"""The gateway's own cost per request, without Ray: the app in-process over an in-memory backend,
at two commits, alternating. Writes the ``gateway-inprocess`` section of docs/benchmarks.md.

What Ray adds (the proxy and handle hops) is the same for both sides and left out here; this is
the work of the gateway code itself (parse, validate, admit, shape, relay), which a change to the
gateway can make cheaper or dearer.

    .venv/bin/python bench/gateway_inprocess.py --base 7749abf [--rounds 3] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, alternating, machine, publish, worktree

# Run in a child with the side's code first on sys.path (its zeroserve, its FakeBackend).
_CHILD = r"""
import asyncio, json, sys, time
import httpx
from tests.unit.gateway_support import FakeBackend
from zeroserve.config import GatewaySpec
from zeroserve.gateway import create_app

HI = [{"role": "user", "content": "hi"}]
CASES = {
    "embeddings": ("/v1/embeddings", {"model": "emb", "input": ["a b", "c"]}),
    "chat": ("/v1/chat/completions", {"model": "gen", "messages": HI}),
    "chat stream": ("/v1/chat/completions", {"model": "gen", "messages": HI, "stream": True}),
    "vLLM stream": ("/v1/completions", {"model": "vgen", "prompt": "hi", "stream": True}),
}

async def main(n):
    app = create_app(GatewaySpec(), FakeBackend())
    out = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        for name, (path, body) in CASES.items():
            for _ in range(200):
                (await client.post(path, json=body)).raise_for_status()
            times = []
            for _ in range(n):
                t = time.perf_counter()
                r = await client.post(path, json=body)
                r.raise_for_status()
                times.append((time.perf_counter() - t) * 1e6)
            out[name] = times
    print(json.dumps(out))

asyncio.run(main(int(sys.argv[1])))
"""


def _commit(ref: str) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _run(code: Path, n: int) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code / "src"), str(code)])}
    env.pop("ZEROSERVE_LOG_LEVEL", None)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n)], env=env, cwd=code, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    base, head = _commit(args.base), _commit("HEAD")
    p50: dict[str, dict[str, list[float]]] = {base: {}, head: {}}
    with (
        tempfile.TemporaryDirectory(prefix="zs-inproc-") as tmp,
        worktree(base, Path(tmp) / "base") as base_tree,
        worktree(head, Path(tmp) / "head") as head_tree,
    ):
        trees = {base: base_tree, head: head_tree}
        for r, label in alternating(args.rounds, base, head):
            for name, times in _run(trees[label], args.n).items():
                p50[label].setdefault(name, []).append(statistics.median(times))
            print(f"round {r + 1}: {label} done", flush=True)
    lines = [
        f"`bench/gateway_inprocess.py --base {args.base} --rounds {args.rounds} --n {args.n}`; {machine()}.",
        f"The gateway app in-process (httpx ASGI transport, the in-memory backend of the unit tests), {args.n}",
        "sequential requests per kind after 200 warm-up ones, the two commits alternating in separate",
        "processes. Each cell: the median over rounds of each round's p50, in microseconds (the rounds' p50s).",
        "",
        f"| request | {base} µs | {head} µs | change |",
        "| --- | --- | --- | --- |",
    ]
    for name in p50[base]:
        old, new = statistics.median(p50[base][name]), statistics.median(p50[head][name])
        spread_old = ", ".join(f"{v:.0f}" for v in p50[base][name])
        spread_new = ", ".join(f"{v:.0f}" for v in p50[head][name])
        lines.append(
            f"| {name} | {old:.0f} ({spread_old}) | {new:.0f} ({spread_new}) | {100 * (new / old - 1):+.1f} % |"
        )
    publish("gateway-inprocess", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
