from __future__ import annotations

from collections.abc import Iterator

import pytest

from .serve_leftovers import router_loop_threads, serve_leftovers, stop_serve_leftovers


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests never start Ray (the pattern of Ray's own unit tests)."""
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unit tests must not start Ray")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session", autouse=True)
def _no_serve_leftovers_from_before() -> None:
    """Stop Ray Serve work that earlier tests in this process left running (``pytest tests`` runs
    the loopback integration tests before the unit tests, and their handles outlive their cluster:
    see serve_leftovers)."""
    stop_serve_leftovers()


@pytest.fixture(autouse=True)
def _no_serve_background_work() -> Iterator[None]:
    """A unit test leaves no Ray Serve task or router thread behind (cheap: a look, no import)."""
    threads = router_loop_threads()
    yield
    left = serve_leftovers()
    new_threads = router_loop_threads() - threads
    if left or new_threads:
        stop_serve_leftovers()  # one leak must not spill into the tests after it
        pytest.fail(
            f"the test left Ray Serve background work running: tasks {left}, new router threads "
            f"{len(new_threads)}; a unit test must not use a real DeploymentHandle (fake it at "
            "serve.get_deployment_handle, as test_serve_backend does)",
            pytrace=False,
        )
