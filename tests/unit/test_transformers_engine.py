"""The transformers engine driven in-process, on the real demo models (no Ray)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from zeroserve.config import ModelSpec
from zeroserve.engines import Engine, collect, create_engine
from zeroserve.errors import InvalidRequestError
from zeroserve.protocol import GenerateParams


def _load(task: str, path: Path, **kw: object) -> Engine:
    engine = create_engine(ModelSpec(task=task, model=str(path), **kw))  # type: ignore[arg-type]
    engine.load()
    return engine


@pytest.fixture(scope="module")
def gen(demo_models: dict[str, Path]) -> Engine:
    return _load("generate", demo_models["tiny-llama"], max_model_len=64)


def _cos(a: list[float], b: list[float]) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=0))


def test_minilm_embeddings_have_meaning(demo_models: dict[str, Path]) -> None:
    emb = _load("embed", demo_models["all-MiniLM-L6-v2"])
    a, para, other = emb.embed(
        ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awful."]
    )
    assert len(a.vector) == 384
    assert abs(sum(x * x for x in a.vector) - 1) < 1e-4  # normalized, as sentence-transformers does
    assert _cos(a.vector, para.vector) > _cos(a.vector, other.vector) + 0.3
    with pytest.raises(InvalidRequestError, match="256"):
        emb.check_inputs(["word " * 300])
    with pytest.raises(InvalidRequestError) as err:
        emb.check_inputs(["x"], dimensions=128)
    assert err.value.param == "dimensions"


def test_classifier_probabilities(demo_models: dict[str, Path]) -> None:
    cls = _load("classify", demo_models["tiny-sentiment"])
    good, bad = cls.classify(["I love this, wonderful.", "Terrible and broken."])
    assert (good.label, bad.label) == ("positive", "negative")
    assert abs(sum(good.probs) - 1) < 1e-5


def test_greedy_equals_transformers_generate(gen: Engine) -> None:
    from transformers import AutoModelForCausalLM

    prompt = gen.render_chat([{"role": "user", "content": "What is zeroserve?"}])
    ours = asyncio.run(collect(gen.stream(prompt, GenerateParams(max_tokens=20, temperature=0)), 1))
    tok = gen.tokenizer  # type: ignore[attr-defined]
    model = AutoModelForCausalLM.from_pretrained(gen.source)  # type: ignore[attr-defined]
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    ref = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]
    expected = tok.decode(ref, skip_special_tokens=True)
    assert ours.texts[0] == expected
    assert ours.prompt_tokens == ids.shape[1]


def test_seed_makes_sampling_repeatable_and_n_choices(gen: Engine) -> None:
    params = GenerateParams(max_tokens=12, temperature=1.0, n=3, seed=42)
    one = asyncio.run(collect(gen.stream("The quick", params), 3))
    two = asyncio.run(collect(gen.stream("The quick", params), 3))
    assert one.texts == two.texts and len(one.texts) == 3


def test_stop_sequence_truncates(gen: Engine) -> None:
    prompt = gen.render_chat([{"role": "user", "content": "What is zeroserve?"}])
    full = asyncio.run(collect(gen.stream(prompt, GenerateParams(max_tokens=20, temperature=0)), 1))
    word = full.texts[0].split()[2]
    cut = asyncio.run(collect(gen.stream(prompt, GenerateParams(max_tokens=20, temperature=0, stop=(word,))), 1))
    assert cut.texts[0] == full.texts[0][: full.texts[0].index(word)]
    assert cut.finish_reasons == ["stop"]


def test_length_finish_and_context_limit(gen: Engine) -> None:
    out = asyncio.run(collect(gen.stream("The", GenerateParams(max_tokens=3, temperature=0)), 1))
    assert out.finish_reasons == ["length"] and out.completion_tokens == [3]
    with pytest.raises(InvalidRequestError, match="maximum context length is 64"):
        asyncio.run(collect(gen.stream("word " * 80, GenerateParams(max_tokens=3)), 1))
    with pytest.raises(InvalidRequestError) as err:
        asyncio.run(collect(gen.stream("The", GenerateParams(max_tokens=100)), 1))
    assert err.value.param == "max_tokens"


def test_input_checks_and_a_batch_in_another_thread_share_the_tokenizer(demo_models: dict[str, Path]) -> None:
    """The replica checks inputs on its event loop while a batch runs in a worker thread."""
    import threading

    cls = _load("classify", demo_models["tiny-sentiment"])
    texts = ["short", "a much longer sentence with many more words in it than the short one"]
    errors: list[Exception] = []
    stop = threading.Event()

    def batches() -> None:
        while not stop.is_set():
            try:
                cls.classify(texts)  # type: ignore[attr-defined]
            except Exception as err:  # noqa: BLE001 - recorded for the assertion
                errors.append(err)
                return

    worker = threading.Thread(target=batches)
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not errors:
            cls.check_inputs(texts)
    finally:
        stop.set()
        worker.join()
    assert errors == []


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e-300},  # overflowed the logits to inf: a 500 for a valid request
        {"temperature": 5e-324},
        {"temperature": 1e-40},
        {"temperature": 1e-6},
        {"temperature": 1e-300, "top_p": 1e-300, "n": 3, "seed": 7},
    ],
    ids=["temperature-1e-300", "temperature-denormal", "temperature-1e-40", "temperature-below-eps", "all-tiny"],
)
def test_temperature_below_epsilon_is_greedy(gen: Engine, params: dict[str, object]) -> None:
    n = int(params.get("n", 1))  # type: ignore[call-overload]
    greedy = asyncio.run(collect(gen.stream("The quick", GenerateParams(max_tokens=8, temperature=0, n=n)), n))
    tiny = asyncio.run(collect(gen.stream("The quick", GenerateParams(max_tokens=8, **params)), n))  # type: ignore[arg-type]
    assert tiny.texts == greedy.texts


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-8])
def test_tiny_top_p_keeps_the_most_likely_token(gen: Engine, top_p: float) -> None:
    greedy = asyncio.run(collect(gen.stream("The quick", GenerateParams(max_tokens=8, temperature=0)), 1))
    for temperature in (2.0, 1.0, 1e-5):
        params = GenerateParams(max_tokens=8, temperature=temperature, top_p=top_p, n=2, seed=3)
        out = asyncio.run(collect(gen.stream("The quick", params), 2))
        assert out.texts == greedy.texts * 2


def test_logits_that_overflow_when_scaled_sample_their_most_likely_token() -> None:
    from zeroserve.engines.transformers_engine import _sample

    logits = torch.tensor([[1e38, 3e38, -1e38], [0.0, 5.0, 1.0]])
    for temperature in (0.5, 1e-4):
        picked = _sample(logits, GenerateParams(temperature=temperature, top_p=0.5), torch.Generator().manual_seed(0))
        assert picked.tolist() == [1, 1]
    # A row that does not overflow still samples (top_p=1 keeps every token).
    flat = torch.zeros(1, 4)
    seen = {int(_sample(flat, GenerateParams(temperature=1.0), None)) for _ in range(200)}
    assert seen == {0, 1, 2, 3}


def test_an_engine_error_after_its_caller_left_prints_no_thread_traceback(
    gen: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker thread told a closed loop it was done: "Event loop is closed" in the thread."""
    import threading

    caller_left = threading.Event()
    thread_errors: list[BaseException | None] = []

    def failing(prompt_ids: object, params: object, budget: object, emit: Any, cancel: object) -> None:
        emit(RuntimeError("sampler failed"))
        caller_left.wait(5)  # the caller's loop closes before the worker's last message

    monkeypatch.setattr(gen, "_generate", failing)
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_value))
    with pytest.raises(RuntimeError, match="sampler failed"):
        asyncio.run(collect(gen.stream("The", GenerateParams(max_tokens=3)), 1))
    caller_left.set()
    workers = [t for t in threading.enumerate() if t.name == "zeroserve-generate"]
    for t in workers:
        t.join(5)
    assert thread_errors == []


def test_prompts_are_tokenized_and_templated_off_the_event_loop(gen: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt of megabytes takes the tokenizer seconds: the replica's event loop (its other
    requests, its health check) must not wait on it."""

    on_loop: list[str] = []
    tokenize, render = gen._tokenize, gen.render_chat  # type: ignore[attr-defined]

    def spy(fn: Any, name: str) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop.append(name)
            except RuntimeError:
                pass  # a worker thread: no loop running here
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(gen, "_tokenize", spy(tokenize, "tokenize"))
    monkeypatch.setattr(gen, "render_chat", spy(render, "render_chat"))

    async def work() -> None:
        with pytest.raises(InvalidRequestError, match="maximum context length"):
            await collect(gen.stream("word " * 20000, GenerateParams(max_tokens=3)), 1)
        with pytest.raises(InvalidRequestError, match="40002 tokens"):
            await gen.acheck_inputs(["word " * 20000])
        await gen.arender_chat([{"role": "user", "content": "hi"}])

    asyncio.run(work())
    assert on_loop == [], f"ran on the event loop: {on_loop}"
