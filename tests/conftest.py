"""Markers by directory: tests/unit -> unit, tests/integration -> integration, tests/gpu -> gpu."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("ZEROSERVE_HOME", str(ROOT))
# Before Ray is imported: a driver reaches the loopback-only test cluster at 127.0.0.1 (see
# zeroserve.cluster.LOOPBACK_ENV; Ray would otherwise swap in the machine's IP).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts[0] in ("unit", "integration", "gpu"):
            item.add_marker(getattr(pytest.mark, parts[0]))
    # The session's one cluster changes mode as rarely as it can (tests/integration/conftest.py):
    # every test that runs on the loopback cluster (the unit tests among them) first, then the one
    # that stops it, then the modules that need it restarted another way (a stop and a start each,
    # 46-48 s measured here, docs/architecture.md "Local cluster").
    order = {"loopback": 0, "one-hop": 2, "joinable": 3}

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("stops_cluster") is not None:
            return 1
        module = getattr(item, "module", None)
        mode = getattr(module, "CLUSTER_MODE", "loopback")
        if mode not in order:
            raise pytest.UsageError(
                f"{getattr(module, '__name__', module)}: CLUSTER_MODE {mode!r} is not one of {sorted(order)}"
            )
        return order[mode]

    items.sort(key=rank)


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Path]:
    """The demo models, built once (a no-op when `make` already built them)."""
    from zeroserve.demo_models import build_all

    return build_all(ROOT / "models")
