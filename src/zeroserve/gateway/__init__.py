"""The gateway: OpenAI HTTP in front of every model application (no Ray imports here)."""

from zeroserve.gateway.app import create_app
from zeroserve.gateway.backend import Backend
from zeroserve.gateway.registry import ModelEntry, ModelState, entries_from_details, gpus_in_use

__all__ = ["Backend", "ModelEntry", "ModelState", "create_app", "entries_from_details", "gpus_in_use"]
