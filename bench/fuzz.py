"""Fuzz the gateway from its OpenAPI schema with schemathesis; print the cases, failures and seed.

In-process (the default) the app runs around the unit tests' in-memory backend: no Ray, no
sockets. ``--url`` fuzzes a running gateway on this machine instead (loopback only: the cases
are hostile on purpose). There the configured models are read from /v1/models and put into a
third of the cases, so those reach real engines; ``--keep-names`` leaves the generated names.

A failure is a 5xx (but a 503 with Retry-After), traceback text, an error body that is not
OpenAI's, an unsafe X-Request-Id, a malformed 2xx, or no answer within 30 s. The same checks
run in tests/unit/test_gateway_fuzz.py with fewer examples.

    .venv/bin/python bench/fuzz.py [--examples 300] [--seed 20260611] [--url http://127.0.0.1:8000]

``make fuzz`` (``--publish``) runs the in-process app twice (300 examples with the default seed,
1000 with seed 1) and writes the table of both runs, with the machine, versions, date and commit,
into the ``fuzz`` section of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from tests.unit.gateway_support import HEALTHY_MODELS, FakeBackend, fuzz_schema  # noqa: E402
from zeroserve.config import GatewaySpec  # noqa: E402
from zeroserve.gateway import create_app  # noqa: E402
from zeroserve.loadgen import require_loopback  # noqa: E402


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"schemathesis {version('schemathesis')}, hypothesis {version('hypothesis')}, "
        f"fastapi {version('fastapi')}; {time.strftime('%Y-%m-%d')}"
    )


def loopback(url: str) -> str:
    """The URL without a trailing slash, or SystemExit unless its host is this machine."""
    try:
        require_loopback(url)
    except ValueError as err:
        raise SystemExit(f"--url: {err}") from None
    return url.rstrip("/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=300, help="hypothesis examples per operation and mode")
    parser.add_argument("--seed", type=int, default=20260611)
    parser.add_argument("--url", help="a live gateway on this machine, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer ... (a live gateway with keys on)")
    parser.add_argument("--keep-names", action="store_true", help="never put configured model names into cases")
    parser.add_argument("--modes", default="positive,negative", help="schemathesis generation modes")
    parser.add_argument("--publish", action="store_true", help="make fuzz: two in-process runs, to docs/reliability.md")
    args = parser.parse_args()
    if args.publish:
        publish()
        return

    import schemathesis

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.url:
        base = loopback(args.url)
        target = base
        try:
            schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        except schemathesis.errors.LoaderError as err:
            raise SystemExit(f"cannot read {base}/openapi.json: {err}") from None
        cards = httpx.get(f"{base}/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"]
        models = {card["id"]: card["zeroserve"]["task"] for card in cards}
    else:
        target = "in-process app, in-memory backend"
        app = create_app(
            GatewaySpec(max_body_bytes=50_000, request_timeout_s=10, cold_start_timeout_s=10), FakeBackend()
        )
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        models = dict(HEALTHY_MODELS)
    modes = [m for m in args.modes.split(",") if m]

    print(f"machine: {machine()}")
    print(f"target: {target}")
    start = time.perf_counter()
    report = fuzz_schema(
        schema,
        examples=args.examples,
        seed=args.seed,
        models={} if args.keep_names else models,
        modes=modes,
        headers=headers,
    )
    seconds = time.perf_counter() - start
    for failure in report.failures[:20]:
        print(f"FAIL {failure}")
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(report.statuses.items()))
    print(
        f"fuzz: {report.cases} cases, {len(report.failures)} failures, seed {args.seed}; "
        f"{args.examples} examples per operation and mode ({'+'.join(modes)}), "
        f"{len(report.skipped)} operation-modes with nothing to generate; statuses {{{statuses}}}; {seconds:.0f} s"
    )
    sys.exit(1 if report.failures else 0)


def publish(runs: tuple[tuple[int, int], ...] = ((300, 20260611), (1000, 1))) -> None:
    """The in-process runs of ``make fuzz``, written to the ``fuzz`` section of docs/reliability.md."""
    import schemathesis

    sys.path.insert(0, str(ROOT / "bench"))
    from common import head_commit, write_section

    commit = head_commit()  # read first: what runs is what was committed then
    rows, answers, failed = [], "", 0
    for examples, seed in runs:
        app = create_app(
            GatewaySpec(max_body_bytes=50_000, request_timeout_s=10, cold_start_timeout_s=10), FakeBackend()
        )
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        start = time.perf_counter()
        report = fuzz_schema(schema, examples=examples, seed=seed, models=dict(HEALTHY_MODELS))
        seconds = time.perf_counter() - start
        if report.cases == 0:
            raise SystemExit("not published: no case was sent")
        for failure in report.failures[:20]:
            print(f"FAIL {failure}")
        failed += len(report.failures)
        run = f"`--examples {examples} --seed {seed}`"
        rows.append(f"| {run} | {report.cases} | {len(report.failures)} | {seconds:.0f} s |")
        answers = ", ".join(f"{code} x{n}" for code, n in sorted(report.statuses.items()))
        print(rows[-1], flush=True)
    lines = [
        f"`make fuzz` (`bench/fuzz.py --publish`), commit {commit}; {machine()}.",
        "",
        "| run (in-process app, in-memory backend) | cases | failures | time |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Answers of the last run: {answers}. The same seed and code give the same counts.",
    ]
    write_section(ROOT / "docs" / "reliability.md", "fuzz", "\n".join(lines))
    print("\n".join(lines))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
