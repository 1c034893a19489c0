"""A per-GPU start lock: two vLLM engines profiling memory on one card at once can both
fail, so engines on the same physical GPU start one after another.

The lock is an ``flock`` on a file named after the GPU's UUID: the kernel releases it when
the holding process dies, so a replica that crashes mid-start never deadlocks the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["gpu_start_lock"]

logger = logging.getLogger(__name__)

LOCK_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "zeroserve-locks"


@contextlib.contextmanager
def gpu_start_lock(gpu_id: str, timeout_s: float = 900, poll_s: float = 0.5) -> Iterator[float]:
    """Hold the start lock of GPU ``gpu_id`` (a UUID); yields the seconds spent waiting.

    Raises:
        TimeoutError: another start held the lock for longer than ``timeout_s``.
    """
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    path = LOCK_DIR / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu_id)}.lock"
    start = time.monotonic()
    with open(path, "a+") as f:
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - start > timeout_s:
                    raise TimeoutError(
                        f"another engine has been starting on GPU {gpu_id} for over {timeout_s:.0f} s"
                    ) from None
                time.sleep(poll_s)
        waited = time.monotonic() - start
        if waited > 1:
            logger.info("waited %.1f s for the start lock of GPU %s", waited, gpu_id)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield waited
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
