"""The ``zeroserve`` logger: one place sets its level and format."""

from __future__ import annotations

import logging

from zeroserve.settings import get_settings

__all__ = ["configure_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> logging.Logger:
    """Configure the ``zeroserve`` logger once per process and return it."""
    logger = logging.getLogger("zeroserve")
    if not getattr(logger, "_zeroserve_configured", False):
        logger.setLevel(get_settings().log_level)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)
        logger.propagate = False
        logger._zeroserve_configured = True  # type: ignore[attr-defined]
    return logger
