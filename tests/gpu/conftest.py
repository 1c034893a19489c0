from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Path]:
    """Only the tiny models: MiniLM (88 MB) does not travel to a lent GPU machine."""
    from zeroserve.demo_models import build_all

    return build_all(ROOT / "models", names=["tiny-llama", "tiny-sentiment"])
