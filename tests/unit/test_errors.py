from __future__ import annotations

import pickle

from zeroserve.errors import InvalidRequestError, ModelNotFoundError, OverloadedError, WrongTaskError


def test_errors_survive_pickling_across_processes() -> None:
    err = InvalidRequestError("too long", param="input", code="context_length_exceeded")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is InvalidRequestError
    assert (back.message, back.param, back.code, back.status_code) == (
        "too long",
        "input",
        "context_length_exceeded",
        400,
    )
    wrong = pickle.loads(pickle.dumps(WrongTaskError("m", "generate", "embeddings")))
    assert wrong.status_code == 400 and wrong.param == "model"


def test_openai_body_and_retry_after() -> None:
    assert ModelNotFoundError("x").body() == {
        "error": {
            "message": "The model 'x' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert OverloadedError("busy", retry_after_s=2.4).headers() == {"Retry-After": "2"}
    assert OverloadedError("busy", retry_after_s=0.1).headers() == {"Retry-After": "1"}
