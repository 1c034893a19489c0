"""The gateway's view of Serve while the controller is down, and of a model still deploying (no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import deployments.gateway as gateway_module
from deployments.gateway import ServeBackend
from zeroserve.config import GatewaySpec
from zeroserve.errors import ModelUnavailableError
from zeroserve.gateway import ModelEntry, ModelState


def _details(*names: str, deployment: str = "ModelServer") -> dict[str, Any]:
    apps = {}
    for name in names:
        apps[name] = {
            "status": "RUNNING",
            "deployed_app_config": {
                "import_path": "deployments.model:build",
                "args": {"task": "embed", "model": "./m"},
            },
            "deployments": {deployment: {"status": "HEALTHY", "replicas": []}} if deployment else {},
        }
    return {"applications": apps}


class _Controller:
    """A controller client whose reads can be made to hang, as they do while it restarts."""

    def __init__(self, details: dict[str, Any]) -> None:
        self.details = details
        self.up = threading.Event()
        self.up.set()
        self.reads = 0

    def get_serve_details(self) -> dict[str, Any]:
        self.reads += 1
        self.up.wait(timeout=30)
        return self.details


@pytest.fixture(autouse=True)
def _short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway_module, "_CONTROLLER_TIMEOUT_S", 0.3)
    monkeypatch.setattr(gateway_module, "_CONTROLLER_BACKOFF_S", 0.2)


async def test_a_hung_controller_costs_one_wait_then_the_last_directory_serves() -> None:
    controller = _Controller(_details("a"))
    backend = ServeBackend(GatewaySpec(discovery_ttl_s=0), client=controller)
    assert set(await backend.models()) == {"a"}
    controller.up.clear()  # the controller dies; reads block until it is back
    try:
        started = time.monotonic()
        assert set(await backend.models(refresh=True)) == {"a"}
        assert time.monotonic() - started < 10  # one wait of 0.3 s, not the 30 s a blocked read takes
        # Later callers, many at once and past the backoff, get the cached directory at once.
        await asyncio.sleep(0.3)
        started = time.monotonic()
        results = await asyncio.gather(*(backend.models(refresh=True) for _ in range(20)))
        assert all(set(r) == {"a"} for r in results)
        assert time.monotonic() - started < 0.3  # none of them waited a controller timeout
        assert controller.reads == 2  # one blocked read, never a pile of threads
    finally:
        controller.details = _details("a", "b")
        controller.up.set()
    await asyncio.sleep(0.3)
    assert set(await backend.models(refresh=True)) == {"a", "b"}


async def test_no_directory_yet_and_no_controller_is_a_clear_503() -> None:
    controller = _Controller(_details("a"))
    controller.up.clear()
    backend = ServeBackend(GatewaySpec(), client=controller)
    try:
        with pytest.raises(ModelUnavailableError, match="directory of models is unreachable") as err:
            await backend.models()
        assert err.value.status_code == 503 and err.value.retry_after_s
    finally:
        controller.up.set()


async def test_a_model_without_its_deployment_yet_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    controller = _Controller(_details("a", deployment=""))
    backend = ServeBackend(GatewaySpec(discovery_ttl_s=0), client=controller)
    made: list[tuple[str, str]] = []

    class _Handle:
        def __init__(self, deployment: str, app: str) -> None:
            self.deployment_name = deployment
            made.append((deployment, app))

    monkeypatch.setattr(gateway_module.serve, "get_deployment_handle", lambda d, a, _check_exists=True: _Handle(d, a))
    entry = (await backend.models())["a"]
    assert entry.deployment == "" and entry.state is not ModelState.FAILED

    async def deployed_soon() -> None:
        await asyncio.sleep(0.6)
        controller.details = _details("a")

    task = asyncio.create_task(deployed_soon())
    handle = await asyncio.wait_for(backend._handle(entry), 5)
    await task
    assert made == [("ModelServer", "a")] and handle.deployment_name == "ModelServer"

    # Removed while waiting: a clear 503 instead of a wait without end.
    waiting = ModelEntry("c", None, ModelState.STARTING)
    controller.details = {"applications": {}}
    with pytest.raises(ModelUnavailableError, match="removed"):
        await asyncio.wait_for(backend._handle(waiting), 5)
