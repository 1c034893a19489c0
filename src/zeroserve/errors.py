"""zeroserve's exceptions and the one place that maps them to OpenAI error bodies.

Every error a client sees has the OpenAI shape
``{"error": {"message", "type", "param", "code"}}`` and a status code that tells a
client whether to retry: 4xx means fix the request, 429/503 come with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = [
    "ZeroserveError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "WrongTaskError",
    "ModelUnavailableError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "EngineError",
    "AuthError",
    "ForbiddenError",
    "QuotaError",
    "LedgerUnavailableError",
    "error_body",
    "MODEL_FAILED_RETRY_FACTOR",
    "model_failed",
    "model_not_ready",
    "model_saturated",
    "pool_busy",
    "replica_died",
    "from_validation",
    "invalid_at",
]


class ZeroserveError(Exception):
    """Base class: carries the HTTP status and the OpenAI error fields.

    These exceptions cross process boundaries (a model replica raises, the gateway
    maps), so they keep only plain, picklable attributes.
    """

    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (type(self), self.message, self.param, self.code, self.retry_after_s),
        )

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, int(round(self.retry_after_s))))}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def _rebuild(
    cls: type[ZeroserveError],
    message: str,
    param: str | None,
    code: str | None,
    retry_after_s: float | None,
) -> ZeroserveError:
    # Bypass subclass constructors (they take other arguments): restore the fields.
    err = cls.__new__(cls)
    ZeroserveError.__init__(err, message, param=param, code=code, retry_after_s=retry_after_s)
    return err


class InvalidRequestError(ZeroserveError):
    """The request is malformed or asks for something the model cannot do (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class WrongTaskError(InvalidRequestError):
    """The model exists but serves another task (embeddings on a generator)."""

    def __init__(self, model: str, task: str, wanted: str) -> None:
        super().__init__(
            f"model '{model}' is a {task} model and does not support {wanted}",
            param="model",
            code="wrong_task",
        )


class PayloadTooLargeError(ZeroserveError):
    status_code = 413
    error_type = "invalid_request_error"


class RequestTimeoutError(ZeroserveError):
    """The client did not send its whole request in time (408)."""

    status_code = 408
    error_type = "invalid_request_error"


class ModelNotFoundError(ZeroserveError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist", param="model", code="model_not_found")


class ModelUnavailableError(ZeroserveError):
    """The model is configured but cannot serve now: waking timed out, failed to deploy."""

    status_code = 503
    error_type = "service_unavailable"


class OverloadedError(ZeroserveError):
    """Too many requests queued: shed load instead of letting clients time out."""

    status_code = 503
    error_type = "server_overloaded"


class AuthError(ZeroserveError):
    """No, malformed, unknown or revoked API key (401)."""

    status_code = 401
    error_type = "invalid_request_error"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ForbiddenError(ZeroserveError):
    """The key's tier may not do this (403)."""

    status_code = 403
    error_type = "permission_error"


class QuotaError(ZeroserveError):
    """Over a quota, rate or concurrency limit: 429 with Retry-After."""

    status_code = 429
    error_type = "rate_limit_error"


class LedgerUnavailableError(ZeroserveError):
    """The key ledger cannot be reached and the gateway cannot decide without it (503)."""

    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, what: str, retry_after_s: float = 5.0) -> None:
        super().__init__(
            f"the key ledger is unreachable, so {what}; retry later",
            code="ledger_unavailable",
            retry_after_s=retry_after_s,
        )


class EngineError(ZeroserveError):
    """The engine failed on a valid request; the message reaching clients stays generic."""

    status_code = 500
    error_type = "internal_error"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """Build the OpenAI error body."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# A model that failed to start is retried by its owner (a fix and a redeploy), not in seconds.
MODEL_FAILED_RETRY_FACTOR = 6


def model_failed(name: str, reason: str, retry_after_s: float) -> ModelUnavailableError:
    """Serve gave up starting ``name`` (its constructor failed), or it is gone."""
    return ModelUnavailableError(
        f"model '{name}' failed to start: {reason or 'see serve status'}",
        code="model_failed",
        retry_after_s=retry_after_s * MODEL_FAILED_RETRY_FACTOR,
    )


def _waited_out(
    name: str, what: str, waited_s: float, why: str, code: str, retry_after_s: float
) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"model '{name}' {what} within {waited_s:.0f} s{why}. Retry later.", code=code, retry_after_s=retry_after_s
    )


def model_not_ready(name: str, waited_s: float, state: str, retry_after_s: float) -> ModelUnavailableError:
    """A request's wait for a cold (or busy) model ran out."""
    why = f" (state was {state}); it may be waking or may not fit on the cluster's GPUs right now"
    return _waited_out(name, "did not answer", waited_s, why, "model_not_ready", retry_after_s)


def pool_busy(name: str, waited_s: float, retry_after_s: float) -> ModelUnavailableError:
    """A cold model waited for a GPU slice, and every model holding one stayed busy."""
    why = ": every model holding one was busy, pinned or just woken"
    return _waited_out(name, "could not get a GPU slice", waited_s, why, "pool_busy", retry_after_s)


def model_saturated(name: str, why: str, retry_after_s: float) -> OverloadedError:
    """The model's capacity and wait queue are full: shed this request at once."""
    return OverloadedError(f"model '{name}' {why}; retry later", code="overloaded", retry_after_s=retry_after_s)


def replica_died(name: str) -> ModelUnavailableError:
    """The replica serving a request went away during it."""
    return ModelUnavailableError(
        f"model '{name}' lost its replica during the request; retry", code="replica_died", retry_after_s=1
    )


def from_validation(err: ValidationError) -> InvalidRequestError:
    """A 400 naming the first invalid field: ``"loc: message"`` with ``param`` its top-level name."""
    first = err.errors()[0]
    return invalid_at([str(p) for p in first["loc"]], first["msg"])


def invalid_at(loc: Sequence[str], msg: str) -> InvalidRequestError:
    """A 400 for the field at ``loc`` (pydantic's error location): ``"a.b: msg"``, ``param`` "a"."""
    msg = msg.removeprefix("Value error, ")
    where = ".".join(loc)
    return InvalidRequestError(f"{where}: {msg}" if where else msg, param=loc[0] if loc else None)
