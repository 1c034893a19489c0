"""How long ``make test`` takes for a newcomer: ``.ci/run`` on a fresh clone of this commit, timed.

The clone is made from this repository's HEAD into a temporary folder (what CI does), and
``bash .ci/run`` runs there with its output kept in a log. The run's wall time is split at the
point pytest starts (set-up: virtualenv and the pinned packages, demo models, ruff, mypy,
Redis) and pytest's own summary line gives the suite's time and counts. Written to the
"ci-time" section of docs/benchmarks.md only when the run passed; a failed run prints its
log's tail and exits non-zero. Needs the machine to itself (the suite starts its own Ray
cluster; another one beside it would slow both).

    .venv/bin/python bench/ci_time.py [--keep] [--no-write]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, head_commit, machine, write_section

DOC = ROOT / "docs" / "benchmarks.md"
PYTEST_START = "pytest -q"
SUMMARY = re.compile(r"^=*\s*(?P<counts>\d+ (?:passed|failed).*?) in (?P<secs>[\d.]+)s", re.M)


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the clone (and its log) afterwards")
    ap.add_argument("--no-write", action="store_true", help="print the figures, leave docs/ alone")
    args = ap.parse_args()

    commit = head_commit()
    if "uncommitted" in commit:
        print("commit first: a fresh clone holds only what is committed", file=sys.stderr)
        return 2
    where = Path(tempfile.mkdtemp(prefix="zs-ci-"))
    clone = where / "zeroserve"
    log_path = where / "ci.log"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    started = time.monotonic()
    pytest_at: float | None = None
    out: list[str] = []
    proc = subprocess.Popen(
        ["bash", ".ci/run"], cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if pytest_at is None and PYTEST_START in line:
            pytest_at = time.monotonic()
    rc = proc.wait()
    total = time.monotonic() - started
    text = "".join(out)
    log_path.write_text(text)
    found = SUMMARY.findall(text)
    if rc != 0 or not found or pytest_at is None:
        print(text[-4000:])
        print(f"\n.ci/run exited {rc} after {minutes(total)}; log: {log_path}", file=sys.stderr)
        return 1
    counts, secs = found[-1]
    setup = pytest_at - started
    slowest = [
        " ".join(m.group(0).split()) for m in re.finditer(r"^\s*[\d.]+s (?:call|setup|teardown)\s+\S+$", text, re.M)
    ][:3]
    lines = [
        f"`bench/ci_time.py` (`bash .ci/run` = `make test` in a fresh clone), commit {commit}; {machine()}.",
        "",
        f"- in all: {minutes(total)}; set-up before pytest (virtualenv and the pinned packages,"
        f" demo models, ruff, mypy, Redis): {minutes(setup)}",
        f"- the suite: {minutes(float(secs))} ({counts})",
        "- its slowest three: " + "; ".join(f"`{s}`" for s in slowest),
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section(DOC, "ci-time", "\n".join(lines))
    if not args.keep:
        shutil.rmtree(where, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
