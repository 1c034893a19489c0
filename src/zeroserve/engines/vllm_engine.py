"""A vLLM engine that reuses vLLM's own OpenAI serving layer.

Chat templates, sampling-parameter mapping, logprobs, tool-call and reasoning parsers,
usage accounting and SSE framing all come from vLLM (``init_app_state`` with arguments
parsed by vLLM's own CLI parser, so every default is vLLM's). zeroserve adds what the
shared pool needs: a memory budget derived from the model's GPU fraction, engine starts
serialized per physical GPU, and errors in zeroserve's types.

No Ray here: the Serve deployment drives this class, and a test can drive it directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from zeroserve.config import ModelSpec, VLLMOptions, resolve_model_source
from zeroserve.engines.base import Engine
from zeroserve.errors import (
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    ZeroserveError,
    invalid_at,
)
from zeroserve.locks import gpu_start_lock
from zeroserve.memory import vllm_memory_utilization
from zeroserve.settings import get_settings
from zeroserve.wire import OpenAIJson, OpenAIStream

__all__ = ["VLLMEngine", "vllm_cli_args"]

logger = logging.getLogger(__name__)


def vllm_cli_args(spec: ModelSpec, name: str, source: str, cuda: bool, total_bytes: int | None) -> list[str]:
    """The ``vllm serve`` arguments for a model spec (a pure function, unit-tested).

    Args:
        spec: the model spec.
        name: the served model name (the model's API name).
        source: local path or hub id.
        cuda: whether the engine runs on a CUDA GPU.
        total_bytes: the GPU's memory, when ``cuda``.
    """
    opts = spec.vllm or VLLMOptions()
    dtype = spec.dtype
    if dtype == "auto" and not cuda:
        dtype = "float32"  # measured: the CPU backend's float32 path is the reliable one here
    argv = ["--model", source, "--served-model-name", name, "--dtype", dtype, "--seed", "0"]
    if spec.task == "embed":
        argv += ["--runner", "pooling", "--convert", "embed"]
    elif spec.task == "classify":
        argv += ["--runner", "pooling", "--convert", "classify"]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if cuda:
        assert total_bytes is not None
        util = vllm_memory_utilization(spec.gpu_fraction, total_bytes, opts.gpu_memory_utilization, model=name)
        argv += ["--gpu-memory-utilization", str(util)]
    if opts.enforce_eager or (opts.enforce_eager is None and not cuda):
        argv.append("--enforce-eager")
    if opts.quantization:
        argv += ["--quantization", opts.quantization]
    if opts.max_num_seqs:
        argv += ["--max-num-seqs", str(opts.max_num_seqs)]
    if opts.enable_prefix_caching is not None:
        argv.append("--enable-prefix-caching" if opts.enable_prefix_caching else "--no-enable-prefix-caching")
    if opts.stream_interval:
        argv += ["--stream-interval", str(opts.stream_interval)]
    return argv


class _RunningRequests:
    """A vLLM stat logger that remembers how many requests ran in one engine step."""

    peak = 0

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        pass

    def record(
        self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
    ) -> None:
        if scheduler_stats is not None:
            running = int(getattr(scheduler_stats, "num_running_reqs", 0))
            _RunningRequests.peak = max(_RunningRequests.peak, running)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


class VLLMEngine(Engine):
    """Serve one model with vLLM's AsyncLLM and vLLM's OpenAI handlers.

    Args:
        spec: the model spec (``engine: vllm``).
        name: the model's API name; vLLM checks requests' ``model`` against it.
    """

    def __init__(self, spec: ModelSpec, name: str | None = None) -> None:
        self.spec = spec
        self.name = name or spec.model
        self.source = resolve_model_source(spec)
        self.client: Any = None
        self.state: Any = None
        self._handlers: dict[str, tuple[type[Any], Any]] = {}
        self.timings: dict[str, float] = {}
        self.device = "cpu"

    def load(self) -> None:
        raise RuntimeError("VLLMEngine starts asynchronously: await engine.start()")

    async def start(self) -> None:
        opts = self.spec.vllm or VLLMOptions()
        start = time.perf_counter()
        import torch

        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        if not cuda:
            # Set before vLLM reads its environment (at import and engine creation).
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{opts.cpu_kv_cache_space_gb:g}")
        if opts.multiprocessing is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if opts.multiprocessing else "0"
        elif not cuda:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not get_settings().allow_hub_download and not self.spec.is_local:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")

        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        self.timings["import_s"] = time.perf_counter() - start
        device = torch.cuda.get_device_properties(0) if cuda else None
        argv = vllm_cli_args(self.spec, self.name, self.source, cuda, device.total_memory if device else None)
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        validate_parsed_serve_args(args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        logger.info("starting vLLM for %s: %s", self.name, " ".join(argv))

        start = time.perf_counter()
        # Engines sharing a GPU start one at a time (their memory profiling would race).
        starting = gpu_start_lock(str(device.uuid)) if device is not None else contextlib.nullcontext(None)
        with starting as waited:
            if waited is not None:
                self.timings["start_lock_wait_s"] = waited
            self.client = AsyncLLM.from_engine_args(engine_args, stat_loggers=[_RunningRequests])  # type: ignore[list-item]
        self.timings["weights_s"] = time.perf_counter() - start
        tasks = await self.client.get_supported_tasks()
        self.state = State()
        await init_app_state(self.client, self.state, args, tasks)
        self._handlers = self._openai_handlers(self.state)
        logger.info("vLLM ready for %s (tasks %s) in %.1f s", self.name, tasks, time.perf_counter() - start)

    def host_bytes(self) -> int:
        """Host memory it holds on the CPU platform: its weights and its KV cache (the warm tier's
        budget counts it); on a GPU both are on the card."""
        if self.device != "cpu":
            return 0
        weights = sum(f.stat().st_size for f in _weight_files(self.source))
        kv = (self.spec.vllm or VLLMOptions()).cpu_kv_cache_space_gb * 1024**3
        return int(weights + kv)

    async def close(self) -> None:
        """Stop vLLM's engine (its engine core process); this engine serves no more."""
        client, self.client = self.client, None
        if client is not None:
            client.shutdown()

    def health(self) -> None:
        if self.client is None:
            raise RuntimeError("engine not started")
        if getattr(self.client, "errored", False):
            raise RuntimeError(f"vLLM engine errored: {getattr(self.client, 'dead_error', '')}")

    @property
    def peak_running_requests(self) -> int:
        return _RunningRequests.peak

    @staticmethod
    def _openai_handlers(s: Any) -> dict[str, tuple[type[Any], Any]]:
        """vLLM's request class and handler per OpenAI endpoint (None: not served), made once."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.pooling.classify.protocol import ClassificationCompletionRequest
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest

        return {
            "chat/completions": (ChatCompletionRequest, getattr(s.openai_serving_chat, "create_chat_completion", None)),
            "completions": (CompletionRequest, getattr(s.openai_serving_completion, "create_completion", None)),
            "embeddings": (EmbeddingCompletionRequest, getattr(s, "serving_embedding", None)),
            "classify": (ClassificationCompletionRequest, getattr(s, "serving_classification", None)),
        }

    def _handler(self, endpoint: str) -> tuple[type[Any], Any]:
        cls, handler = self._handlers.get(endpoint, (None, None))
        if cls is None or handler is None:
            raise InvalidRequestError(f"model '{self.name}' does not serve /{endpoint}", param="model")
        return cls, handler

    async def openai(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        from pydantic import BaseModel
        from starlette.responses import Response
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        cls, handler = self._handler(endpoint)
        try:
            # vLLM's request models raise its own errors from their validators too (a
            # VLLMValidationError is no ValueError, so pydantic lets it through unwrapped).
            request = cls.model_validate(body)
            result = await handler(request, None)
        except Exception as err:
            mapped = _error_from_exception(err)
            if mapped is None:
                raise
            raise mapped from None
        model = str(body.get("model") or self.name)
        if isinstance(result, ErrorResponse):
            raise _error_from_vllm(result.error.code, result.error.message, result.error.param, model)
        if isinstance(result, Response):
            data = json.loads(bytes(result.body))
            if result.status_code >= 400:
                error = data.get("error", {})
                raise _error_from_vllm(result.status_code, error.get("message", ""), error.get("param"), model)
            yield OpenAIJson(data)
            return
        if isinstance(result, BaseModel):
            yield OpenAIJson(result.model_dump(mode="json", exclude_unset=False))
            return
        yield OpenAIStream()
        async for line in result:
            yield line


def _weight_files(source: str) -> list[Path]:
    root = Path(source)
    return [f for f in root.glob("*") if f.suffix in (".safetensors", ".bin", ".pt")] if root.is_dir() else []


def _error_from_vllm(code: int, message: str, param: str | None, model: str | None = None) -> ZeroserveError:
    if code == 404:
        # The requested name: the param is the field's name ("model"), not the model's.
        return ModelNotFoundError(model or "model")
    if 400 <= code < 500:
        return InvalidRequestError(message, param=param)
    if code == 503:
        return ModelUnavailableError(message, retry_after_s=1)
    logger.error("vLLM error %s: %s", code, message)
    return EngineError("the model's engine failed on this request")


def _sanitize(message: str) -> str:
    """vLLM's own scrubbing of error messages (memory addresses, file paths, tracebacks)."""
    try:
        from vllm.entrypoints.serve.exception_handling.utils import sanitize_message
    except ImportError:  # another vLLM layout: the message as it is
        return message
    return str(sanitize_message(message))


def _message(err: BaseException) -> str:
    # VLLMValidationError's str() appends "(parameter=..., value=...)": the first argument is the message.
    first = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
    return _sanitize(first)


# pydantic-core's names for union branches and validator wrappers in an error's loc
# ("prompt.list[constrained-int].0", "response_format.function-wrap[__log_extra_fields__()].json_schema"):
# not fields a client knows (vLLM drops them too: clean_loc_for_param).
_INTERNAL_LOC = frozenset(
    {
        "function-wrap",
        "function-after",
        "function-before",
        "function-plain",
        "json-or-python",
        "lax-or-strict",
        "chain",
        "default",
        "nullable",
        "tagged-union",
        "union",
        "call",
        "arguments",
        "is-instance",
        "is-subclass",
        "callable",
        "str",
        "int",
        "float",
        "bool",
        "bytes",
        "bytearray",
        "list",
        "tuple",
        "dict",
        "set",
        "frozenset",
        "complex",
        "none",
        "nonetype",
    }
)


def _clean_loc(loc: Sequence[Any]) -> list[str]:
    parts = [str(p) for p in loc]
    kept = [p for p in parts if not any(c in p for c in "[](){}") and p.lower() not in _INTERNAL_LOC]
    return kept or parts


def _invalid_from_validation(err: Any) -> InvalidRequestError:
    """A pydantic ValidationError as the gateway words it: ``"loc: msg"``, param the top-level field.

    Where the first error is one branch of a union (``stop`` as a string, when a list was sent),
    the error of the branch that matched the value's type says what is wrong: among the errors of
    the first error's field, the deepest one that is not a type mismatch is reported.
    """
    errors = list(err.errors())
    if not errors:
        return InvalidRequestError(_sanitize(str(err)))
    field = errors[0]["loc"][:1]

    def rank(item: tuple[int, Any]) -> tuple[int, bool, int]:
        index, e = item
        mismatch = str(e.get("type", "")).endswith("_type") or e.get("type") in ("literal_error", "missing")
        return (-len(_clean_loc(e["loc"])), mismatch, index)

    same_field = [(i, e) for i, e in enumerate(errors) if tuple(e["loc"][:1]) == tuple(field)]
    _, best = min(same_field, key=rank)
    return invalid_at(_clean_loc(best["loc"]), _sanitize(str(best["msg"])))


def _error_from_exception(err: Exception) -> ZeroserveError | None:
    """What vLLM's HTTP layer answers for an exception its handlers raised, in zeroserve's types.

    The same classes as vLLM's ``create_error_response`` (exception_handling): client errors and
    the raw ValueError, TypeError, OverflowError, NotImplementedError and jinja TemplateError are a
    400 with vLLM's message; server errors a 500 (logged, generic message); a retryable one or an
    admission refusal a 503. None: not an error vLLM knows; the caller re-raises it.
    """
    from pydantic import ValidationError
    from vllm.exceptions import (
        GenerationError,
        GracefulHTTPError,
        RetryableRequestError,
        VLLMClientError,
        VLLMNotFoundError,
        VLLMServerError,
    )

    if isinstance(err, ZeroserveError):
        return err
    if isinstance(err, GracefulHTTPError):
        return _error_from_vllm(int(err.http_status), _sanitize(err.message), None)
    if isinstance(err, VLLMNotFoundError):
        return InvalidRequestError(_message(err), code="not_found")
    if isinstance(err, VLLMClientError):
        return InvalidRequestError(_message(err), param=getattr(err, "parameter", None))
    if isinstance(err, RetryableRequestError):
        return _error_from_vllm(503, _message(err), None)
    if isinstance(err, GenerationError | VLLMServerError):
        logger.error("vLLM failed on a request: %r", err)
        return EngineError("the model's engine failed on this request")
    if isinstance(err, ValidationError):  # a ValueError: before the raw ones
        return _invalid_from_validation(err)
    if isinstance(err, ValueError | TypeError | OverflowError | NotImplementedError) or any(
        c.__name__ == "TemplateError" for c in type(err).__mro__
    ):
        return InvalidRequestError(_message(err))
    return None
