"""The gateway's added latency at two commits, back to back on this machine: did a change cost anything?

Runs ``bench/gateway_latency.py`` (this tree's script) alternately against the code of ``--base``
(a detached git worktree, put first on every Ray process's PYTHONPATH) and this tree's code,
``--rounds`` times each, and writes the ``gateway-ab`` section of docs/benchmarks.md. Each run
measures the gateway against a direct DeploymentHandle call on its own cluster, so what is
compared is the gateway's cost over the handle, run by run, not absolute times.

    .venv/bin/python bench/gateway_ab.py --base 7749abf [--rounds 2] [--n 300]
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

from common import ROOT, alternating, machine, pct, publish, worktree


def _commit(ref: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


def _env(code: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code / "src"), str(code), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    return env


def _imports(code: Path | None) -> str:
    """Where a process started like the run's cluster finds zeroserve and deployments (Ray's
    workers also search the starting directory: the run starts in ``code``)."""
    probe = "import deployments, zeroserve; print(deployments.__path__[0], zeroserve.__path__[0])"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=_env(code), cwd=code or ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _run(code: Path | None, n: int, out: Path) -> dict[str, list[float]]:
    """One gateway_latency run; ``code``: a tree whose src/ and deployments/ replace this one's."""
    cmd = [sys.executable, str(ROOT / "bench" / "gateway_latency.py"), "--n", str(n), "--no-write", "--json", str(out)]
    subprocess.run(
        cmd,
        env=_env(code),
        cwd=code or ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=1200,
    )
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="the commit to compare this tree with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    base, head = _commit(args.base), _commit("HEAD")
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "src", "deployments"], cwd=ROOT, capture_output=True, text=True
    )
    head_label = head + ("+uncommitted" if dirty.stdout.strip() else "")
    runs: dict[str, list[dict[str, list[float]]]] = {base: [], head_label: []}
    with tempfile.TemporaryDirectory(prefix="zs-ab-") as tmp, worktree(base, Path(tmp) / "base") as tree:
        seen = _imports(tree)
        if not seen.startswith(str(tree)) or str(tree / "src") not in seen:
            raise SystemExit(f"the base run would not use the base code: {seen}")
        code = {base: tree, head_label: None}
        for r, label in alternating(args.rounds, base, head_label):
            runs[label].append(_run(code[label], args.n, Path(tmp) / f"{label}-{r}.json"))
            print(f"round {r + 1}: {label} done", flush=True)

    lines = [
        f"`bench/gateway_ab.py --base {args.base} --rounds {args.rounds} --n {args.n}`; {machine()}.",
        f"Each run: its own local cluster, MiniLM warm, {args.n} embedding requests per path interleaved",
        "(gateway over HTTP, and a direct DeploymentHandle call); the two commits' runs alternate. Added =",
        "gateway minus handle in the same run; the table gives each run's figures.",
        "",
        "| code | run | gateway p50 ms | handle p50 ms | added p50 ms | gateway p99 ms | handle p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    added: dict[str, list[float]] = {}
    for label, results in runs.items():
        for i, res in enumerate(results, 1):
            g, h = res["gateway (HTTP)"], res["DeploymentHandle"]
            diff = statistics.median(g) - statistics.median(h)
            added.setdefault(label, []).append(diff)
            lines.append(
                f"| {label} | {i} | {statistics.median(g):.2f} | {statistics.median(h):.2f} | {diff:.2f} | "
                f"{pct(g, 99):.2f} | {pct(h, 99):.2f} |"
            )
    lines += [
        "",
        "Median of the runs' added p50: "
        + ", ".join(f"{label} {statistics.median(v):.2f} ms" for label, v in added.items())
        + ". What this does not show: streaming paths and vLLM (this is one embedding request), and",
        "differences smaller than the run-to-run spread in the table.",
    ]
    publish("gateway-ab", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
