"""Four vLLM engines at 0.25 of one GPU each (marker ``gpu``; needs CUDA and the CUDA vllm).

Each engine runs in its own process, as replicas do; their starts go through the per-GPU
start lock; all four serve at once, and none holds more than its share (nvidia-smi).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import asyncio, json, os, sys, time
    from zeroserve.config import ModelSpec
    from zeroserve.engines import create_engine

    async def main():
        spec = ModelSpec(task="generate", engine="vllm", model=sys.argv[1], gpu_fraction=0.25,
                         max_model_len=512, dtype="bfloat16")
        engine = create_engine(spec, "m")
        t = time.time()
        await engine.start()
        print(json.dumps({"event": "ready", "pid": os.getpid(), "start_s": time.time() - t,
                          "timings": engine.timings}), flush=True)
        sys.stdin.readline()  # wait until every engine is up
        body = {"model": "m", "prompt": "The quick", "max_tokens": 64, "temperature": 0}
        outs = await asyncio.gather(*[_one(engine, body) for _ in range(8)])
        print(json.dumps({"event": "served", "tokens": sum(outs)}), flush=True)
        sys.stdin.readline()

    async def _one(engine, body):
        async for kind, data in engine.openai("completions", body):
            return data["usage"]["completion_tokens"]

    asyncio.run(main())
""")


def test_four_vllm_engines_share_one_gpu(demo_models: dict[str, Path]) -> None:
    model = demo_models["tiny-llama"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(model)],
            cwd=ROOT,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    try:
        ready = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        assert all(r["event"] == "ready" for r in ready)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()  # type: ignore[union-attr]  # noqa: E702
        served = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        assert all(s["tokens"] > 0 for s in served)
        smi = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        ).stdout
        used = {int(a): int(b) for a, b in (ln.split(",") for ln in smi.strip().splitlines())}
        share_mib = 0.25 * torch.cuda.get_device_properties(0).total_memory / 2**20
        report = {
            r["pid"]: {
                "start_s": r["start_s"],
                "lock_wait_s": r["timings"].get("start_lock_wait_s"),
                "used_mib": used.get(r["pid"]),
                "share_mib": share_mib,
            }
            for r in ready
        }
        print(json.dumps(report, indent=1))
        # The engine core is a child process: count the replica and its children together.
        assert sum(used.values()) <= 4 * share_mib
        for p in procs:
            p.stdin.write("done\n")
            p.stdin.flush()  # type: ignore[union-attr]  # noqa: E702
    finally:
        for p in procs:
            p.kill()
        time.sleep(1)
