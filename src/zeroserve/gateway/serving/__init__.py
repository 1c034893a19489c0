"""One serving object per endpoint family; routes (``gateway/routes.py``) call them."""

from zeroserve.gateway.serving.base import Serving
from zeroserve.gateway.serving.encode import EncodeServing
from zeroserve.gateway.serving.generate import GenerateServing
from zeroserve.gateway.serving.passthrough import PassthroughServing
from zeroserve.gateway.serving.pool import PoolServing

__all__ = ["EncodeServing", "GenerateServing", "PassthroughServing", "PoolServing", "Serving"]
