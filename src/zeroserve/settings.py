"""Every environment variable zeroserve reads, in one place.

``ZEROSERVE_HOME`` (default: the current directory)
    Root against which relative model paths (``./models/x``) are resolved. ``make run``
    sets it to the repository root for the whole Ray cluster.
``ZEROSERVE_LOG_LEVEL`` (default ``INFO``)
    Level of the ``zeroserve`` logger.
``ZEROSERVE_TORCH_THREADS`` (default ``1``)
    Intra-op threads per CPU engine: replicas ask Ray for a fraction of a CPU, so one
    thread each keeps many models from fighting over the cores.
``ZEROSERVE_ALLOW_HUB_DOWNLOAD`` (default ``0``)
    Let engines download hub ids missing from the local cache. Off by default, so that a
    misconfigured model fails fast instead of hanging on a network that is not there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Settings", "get_settings"]


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    home: Path
    log_level: str
    torch_threads: int
    allow_hub_download: bool


def get_settings() -> Settings:
    """Read the environment now (not at import time, so tests and workers see their own)."""
    return Settings(
        home=Path(os.environ.get("ZEROSERVE_HOME") or os.getcwd()),
        log_level=os.environ.get("ZEROSERVE_LOG_LEVEL", "INFO").upper(),
        torch_threads=max(1, int(os.environ.get("ZEROSERVE_TORCH_THREADS", "1"))),
        allow_hub_download=_flag("ZEROSERVE_ALLOW_HUB_DOWNLOAD", False),
    )
