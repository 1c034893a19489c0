"""A transformers engine for embeddings, classification and small text generators.

The device follows ``torch.cuda.is_available()``, never the config. On CUDA the
process may use at most its GPU fraction of the card's memory
(``torch.cuda.set_per_process_memory_fraction``): Ray's ``num_gpus`` is only a label.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from zeroserve.config import ModelSpec, resolve_model_source
from zeroserve.engines.base import Accepted, Classification, Delta, Embedding, Engine
from zeroserve.errors import InvalidRequestError, ModelUnavailableError
from zeroserve.protocol import GenerateParams
from zeroserve.settings import get_settings

__all__ = ["TransformersEngine"]

logger = logging.getLogger(__name__)

_DONE = object()


class TransformersEngine(Engine):
    """Serve one ``transformers`` model for its task.

    Args:
        spec: the model's validated spec.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.source = resolve_model_source(spec)
        self.model: Any = None
        self.tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self.device = "cpu"
        self.max_len = spec.max_model_len or 0
        self._pooling = "mean"
        self._normalize = True
        self._broken: str | None = None
        self.timings: dict[str, float] = {}
        # Built on the host whatever the node has (a warm copy, deployments/warm.py); place()
        # moves it to a GPU and back.
        self.host_only = False

    def place(self, device: str) -> None:
        """Move the built model to ``device`` ("cpu", or "cuda:N" held to the model's fraction)."""
        import torch

        if device == self.device:
            return
        if device.startswith("cuda"):
            torch.cuda.set_per_process_memory_fraction(self.spec.gpu_fraction, torch.device(device))
        self.model = self.model.to(device)
        previous, self.device = self.device, device
        if previous.startswith("cuda"):
            torch.cuda.empty_cache()  # what stays on the card is the CUDA context

    # -- loading -------------------------------------------------------------------
    def load(self) -> None:
        start = time.perf_counter()
        import torch
        import transformers

        self.timings["import_s"] = time.perf_counter() - start
        settings = get_settings()
        torch.set_num_threads(settings.torch_threads)
        if torch.cuda.is_available() and not self.host_only:
            self.device = "cuda"
            # Hold this process to its share of the card so a neighbour cannot be starved.
            torch.cuda.set_per_process_memory_fraction(self.spec.gpu_fraction)
        common: dict[str, Any] = {
            "local_files_only": not settings.allow_hub_download,
            "trust_remote_code": False,
        }
        start = time.perf_counter()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.source, **common)
        auto = {
            "embed": transformers.AutoModel,
            "classify": transformers.AutoModelForSequenceClassification,
            "generate": transformers.AutoModelForCausalLM,
        }[self.spec.task]
        model = auto.from_pretrained(self.source, dtype=self._dtype(torch), **common)
        self.model = model.to(self.device).eval()
        self.timings["weights_s"] = time.perf_counter() - start
        self.max_len = self._context_length()
        if self.spec.task == "embed":
            self._read_pooling()
        if self.spec.task == "generate" and self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        logger.info(
            "loaded %s (%s, %s) on %s, context %d",
            self.source,
            self.spec.task,
            type(self.model).__name__,
            self.device,
            self.max_len,
        )

    def _dtype(self, torch: Any) -> Any:
        if self.spec.dtype != "auto":
            return getattr(torch, self.spec.dtype)
        # float32 on CPU: half precision matmuls are slow or missing there.
        return "auto" if self.device == "cuda" else torch.float32

    def _context_length(self) -> int:
        cfg = self.model.config
        native = getattr(cfg, "max_position_embeddings", None) or 2048
        st_cfg = Path(self.source) / "sentence_bert_config.json"
        if st_cfg.is_file():
            native = min(native, int(json.loads(st_cfg.read_text()).get("max_seq_length", native)))
        if self.spec.max_model_len:
            return min(native, self.spec.max_model_len)
        return int(native)

    def _read_pooling(self) -> None:
        """Follow the sentence-transformers config when the folder has one."""
        root = Path(self.source)
        modules = root / "modules.json"
        if not modules.is_file():
            return
        entries = json.loads(modules.read_text())
        self._normalize = any(e.get("type", "").endswith("Normalize") for e in entries)
        for e in entries:
            if e.get("type", "").endswith("Pooling"):
                pooling_cfg = root / e.get("path", "") / "config.json"
                if pooling_cfg.is_file():
                    cfg = json.loads(pooling_cfg.read_text())
                    if cfg.get("pooling_mode_cls_token"):
                        self._pooling = "cls"
                    elif cfg.get("pooling_mode_max_tokens"):
                        self._pooling = "max"

    def host_bytes(self) -> int:
        """Bytes of the model's weights and buffers (what keeping it built holds)."""
        if self.model is None:
            return 0
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def health(self) -> None:
        if self._broken:
            raise RuntimeError(self._broken)
        if self.model is None:
            raise RuntimeError("engine not loaded")

    # -- embeddings and classification ----------------------------------------------
    def _tokenize(self, *args: Any, **kwargs: Any) -> Any:
        """Call the tokenizer, one call at a time.

        A fast tokenizer keeps its padding and truncation settings in shared state that each call
        sets: input checks on the event loop and a batch on a worker thread, interleaved, left a
        batch unpadded ("Unable to create tensor"), a 500 under load (make load found it).
        """
        with self._tokenizer_lock:
            return self.tokenizer(*args, **kwargs)

    def _token_counts(self, texts: Sequence[str]) -> list[int]:
        enc = self._tokenize(list(texts), add_special_tokens=True, truncation=False)
        return [len(ids) for ids in enc["input_ids"]]

    def check_inputs(self, texts: Sequence[str], dimensions: int | None = None) -> None:
        if dimensions is not None:
            hidden_size = int(self.model.config.hidden_size)
            if self.spec.task != "embed" or dimensions != hidden_size:
                raise InvalidRequestError(
                    f"this model produces {hidden_size}-dimensional embeddings and cannot shorten them to {dimensions}",
                    param="dimensions",
                )
        if not texts:
            return
        for i, count in enumerate(self._token_counts(texts)):
            if count > self.max_len:
                raise InvalidRequestError(
                    f"input[{i}] has {count} tokens; this model's maximum is {self.max_len}",
                    param="input",
                    code="context_length_exceeded",
                )

    def _encode(self, texts: Sequence[str]) -> Any:
        enc = self._tokenize(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_len,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def embed(self, texts: Sequence[str], dimensions: int | None = None) -> list[Embedding]:
        import torch

        self.check_inputs([], dimensions)
        enc = self._encode(texts)
        with self._guard(), torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self._pooling == "cls":
            pooled = hidden[:, 0]
        elif self._pooling == "max":
            pooled = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self._normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        counts = enc["attention_mask"].sum(dim=1).tolist()
        vectors = pooled.float().cpu().tolist()
        return [Embedding(v, int(c)) for v, c in zip(vectors, counts, strict=True)]

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        import torch

        enc = self._encode(texts)
        with self._guard(), torch.inference_mode():
            logits = self.model(**enc).logits.float()
        if getattr(self.model.config, "problem_type", None) == "multi_label_classification":
            probs = torch.sigmoid(logits)
        else:
            probs = torch.softmax(logits, dim=-1)
        id2label = self.model.config.id2label
        counts = enc["attention_mask"].sum(dim=1).tolist()
        out = []
        for row, count in zip(probs.cpu().tolist(), counts, strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Classification(str(id2label.get(best, best)), row, int(count)))
        return out

    # -- generation -----------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"model '{self.spec.model}' has no chat template; use /v1/completions",
                param="messages",
            )
        try:
            return str(self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
        except Exception as err:  # noqa: BLE001 - jinja raises on messages a template refuses
            raise InvalidRequestError(
                f"the model's chat template refused these messages: {err}", param="messages"
            ) from None

    def _budget(self, prompt_tokens: int, params: GenerateParams) -> int:
        room = self.max_len - prompt_tokens
        if room <= 0 or (params.max_tokens is not None and params.max_tokens > room):
            asked = params.max_tokens or 1
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_len} tokens. However, you "
                f"requested {prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, "
                f"{asked} for the completion). Please shorten the prompt or max_tokens.",
                param="messages" if room <= 0 else "max_tokens",
                code="context_length_exceeded",
            )
        return min(params.max_tokens or self.spec.max_tokens_cap, room)

    async def stream(self, prompt: str, params: GenerateParams) -> AsyncIterator[Accepted | Delta]:
        # A prompt of megabytes takes the tokenizer a second or more: off the event loop, which
        # serves the replica's other requests and its health check meanwhile.
        prompt_ids = (await asyncio.to_thread(self._tokenize, prompt, add_special_tokens=True))["input_ids"]
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        budget = self._budget(len(prompt_ids), params)
        yield Accepted(len(prompt_ids))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            # The consumer may be gone with its loop (a caller that stopped on the first error):
            # then there is no one to tell, and raising here only printed a thread traceback.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> None:
            try:
                self._generate(prompt_ids, params, budget, emit, cancel)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                emit(exc)
            finally:
                emit(_DONE)

        worker = threading.Thread(target=run, name="zeroserve-generate", daemon=True)
        worker.start()
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()

    def _generate(
        self,
        prompt_ids: list[int],
        params: GenerateParams,
        budget: int,
        emit: Any,
        cancel: threading.Event,
    ) -> None:
        import torch

        n = params.n
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed % (2**63))
        eos = self._eos_ids()
        stops = params.stop
        hold = max((len(s) for s in stops), default=1) - 1
        tokens: list[list[int]] = [[] for _ in range(n)]
        sent = [""] * n
        done = [False] * n
        cur = torch.tensor([prompt_ids] * n, device=self.device)
        past = None
        with self._guard(), torch.inference_mode():
            for _ in range(budget):
                if cancel.is_set():
                    return
                out = self.model(input_ids=cur, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = _sample(out.logits[:, -1, :].float(), params, gen)
                for i in range(n):
                    if done[i]:
                        continue
                    tok = int(nxt[i])
                    if tok in eos:
                        done[i] = True
                        # The end-of-sequence token was generated too: count it, as vLLM does.
                        emit(
                            Delta(
                                i,
                                sent_rest(self, tokens[i], sent[i], stops),
                                "stop",
                                completion_tokens=len(tokens[i]) + 1,
                            )
                        )
                        continue
                    tokens[i].append(tok)
                    text = self.tokenizer.decode(tokens[i], skip_special_tokens=True)
                    cut = _find_stop(text, stops)
                    if cut is not None:
                        done[i] = True
                        emit(Delta(i, text[len(sent[i]) : cut], "stop", completion_tokens=len(tokens[i])))
                        continue
                    safe = len(text) - hold
                    if text.endswith("\ufffd"):
                        safe = min(safe, len(text) - 1)
                    if safe > len(sent[i]):
                        emit(Delta(i, text[len(sent[i]) : safe], completion_tokens=len(tokens[i])))
                        sent[i] = text[:safe]
                if all(done):
                    return
                cur = nxt.unsqueeze(-1)
        for i in range(n):
            if not done[i]:
                emit(Delta(i, sent_rest(self, tokens[i], sent[i], stops), "length", completion_tokens=len(tokens[i])))

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config, self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
        return ids

    def _guard(self) -> _OOMGuard:
        return _OOMGuard(self.spec)


def sent_rest(engine: TransformersEngine, tokens: list[int], sent: str, stops: Sequence[str]) -> str:
    """What is left to send of a finished choice (text held back for stop matching)."""
    text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    cut = _find_stop(text, stops)
    return text[len(sent) : cut if cut is not None else len(text)]


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [pos for s in stops if (pos := text.find(s)) >= 0]
    return min(found) if found else None


# As vLLM (vllm/v1/sample/sampler.py, _SAMPLING_EPS): a temperature below this is greedy sampling.
# Dividing the logits by a smaller one (1e-300 passes validation) overflows them to inf, the softmax
# to NaN, and torch.multinomial raised: a 500 for a valid request.
_SAMPLING_EPS = 1e-5


def _sample(logits: Any, params: GenerateParams, gen: Any) -> Any:
    import torch

    greedy = logits.argmax(dim=-1)
    if params.temperature < _SAMPLING_EPS:
        return greedy
    scaled = logits / params.temperature
    # A row the division still overflowed (huge logits) samples its most likely token, as a
    # temperature that tends to zero does; never a NaN distribution handed to multinomial.
    finite = torch.isfinite(scaled).all(dim=-1, keepdim=True)
    probs = torch.softmax(torch.where(finite, scaled, torch.zeros_like(scaled)), dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = cumulative - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    sampled = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return torch.where(finite.squeeze(-1), sampled, greedy)


class _OOMGuard:
    """Turn a CUDA out-of-memory error into a clear, per-request error."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        import torch

        if exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
            raise ModelUnavailableError(
                f"the request needed more GPU memory than this model's "
                f"{self.spec.gpu_fraction:g} share of the card; retry with a smaller input",
                code="gpu_memory_exceeded",
                retry_after_s=1,
            ) from None
