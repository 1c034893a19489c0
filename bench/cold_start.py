"""Cold start of each demo model from zero, split into phases, beside a plain disk read.

    request ──► replica process starts ──► engine load (imports, weights) ──► first answer

- schedule+process: from the request to the replica constructor's first line
  (autoscaler decision, placement, worker process, Python imports of Serve);
- imports: torch and transformers imported by the engine;
- weights: tokenizer and weights loaded (from_pretrained) and moved to the device;
- first answer: from the engine being ready to the response (replica registration,
  routing, first inference).

    .venv/bin/python bench/cold_start.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import httpx
from common import ROOT, cluster, demo_config, deploy, machine, wait

REQUESTS = {
    "all-MiniLM-L6-v2": ("/v1/embeddings", {"input": "hello world", "encoding_format": "float"}),
    "tiny-sentiment": ("/v1/classify", {"input": "I love it"}),
    "tiny-llama": ("/v1/completions", {"prompt": "The quick", "max_tokens": 8, "temperature": 0}),
}


def read_weights(folder: Path) -> float:
    start = time.perf_counter()
    for f in folder.glob("*.safetensors"):
        f.read_bytes()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import ray
    from ray import serve

    rows: dict[str, list[dict[str, float]]] = {m: [] for m in REQUESTS}
    fast = {
        "downscale_delay_s": 1,
        "downscale_to_zero_delay_s": 3,
        "look_back_period_s": 1,
        "metrics_interval_s": 0.5,
        "upscale_delay_s": 0,
    }
    with cluster() as (c, port):
        deploy(c, demo_config(port, fast, only=tuple(REQUESTS)), port)
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        http = httpx.Client(timeout=300)
        for _ in range(args.rounds):
            for model, (route, body) in REQUESTS.items():
                # Wait until the model is really at zero.
                wait(
                    lambda m=model: (
                        httpx.get(f"http://127.0.0.1:{port}/v1/models/{m}").json()["zeroserve"]["state"] == "cold"
                    ),
                    120,
                )
                t0 = time.time()
                http.post(f"http://127.0.0.1:{port}{route}", json={"model": model, **body}).raise_for_status()
                t_end = time.time()
                stats = serve.get_app_handle(model).stats.remote().result()
                eng = stats["engine_timings"]
                load = stats["ready_at"] - stats["started_at"]
                rows[model].append(
                    {
                        "total": t_end - t0,
                        "schedule+process": stats["started_at"] - t0,
                        "imports": eng.get("import_s", 0.0),
                        "weights": eng.get("weights_s", 0.0),
                        "other init": load - eng.get("import_s", 0.0) - eng.get("weights_s", 0.0),
                        "first answer": t_end - stats["ready_at"],
                        "disk read": read_weights(ROOT / "models" / model),
                    }
                )
        ray.shutdown()

    print(f"machine: {machine()}")
    cols = ["total", "schedule+process", "imports", "weights", "other init", "first answer", "disk read"]
    print("| model | " + " | ".join(f"{c} (s)" for c in cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for model, samples in rows.items():
        med = [statistics.median(s[c] for s in samples) for c in cols]
        print(f"| {model} | " + " | ".join(f"{v:.2f}" for v in med) + " |")
    print(f"(median of {args.rounds} cold starts each)")


if __name__ == "__main__":
    main()
