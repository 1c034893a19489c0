"""`make run`'s path with the demo's own gateway args: API keys on, a key of the free tier made
and printed by `zeroserve deploy`, kept across deploys, and what a newcomer then sees with the
official `openai` client: the quota headers and `GET /v1/usage`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from zeroserve.config import load_serve_config

from .conftest import ROOT, Pool

EMB = "all-MiniLM-L6-v2"


def _deploy(config: Path, run_dir: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "zeroserve.cli", "deploy", str(config), "--run-dir", str(run_dir), "--timeout", "180"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_the_demo_prints_a_key_that_shows_the_quotas(pool: Pool, tmp_path: Path) -> None:
    cfg = load_serve_config(ROOT / "serve_config.demo.yaml")
    cfg["http_options"] = {"host": "127.0.0.1", "port": pool.http_port}
    gateway, *models = cfg["applications"]
    assert gateway["args"]["auth"]["enabled"] is True  # the demo as shipped
    gateway["args"]["auth"]["ledger"]["path"] = str(tmp_path / "ledger.sqlite3")
    cfg["applications"] = [gateway, next(a for a in models if a["name"] == EMB)]
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    key_file = pool.run_dir / "demo-key"
    key_file.unlink(missing_ok=True)

    printed = _deploy(config, pool.run_dir)
    key = key_file.read_text().strip()
    assert f"API key         : {key}" in printed and "(tier free; new," in printed
    assert key_file.stat().st_mode & 0o077 == 0  # readable by its owner only

    client = openai.OpenAI(base_url=f"{pool.base_url}/v1", api_key=key, max_retries=0)
    raw = client.embeddings.with_raw_response.create(model=EMB, input="hello")
    assert len(raw.parse().data[0].embedding) == 384
    charged = float(raw.headers["x-zeroserve-gpu-seconds"])
    assert charged > 0 and float(raw.headers["x-zeroserve-quota-remaining"]) == pytest.approx(600 - charged, abs=1e-5)
    usage = httpx.get(f"{pool.base_url}/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=30).json()
    assert usage["tier"] == "free" and usage["gpu_seconds_used"] == pytest.approx(charged, abs=1e-6)

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{pool.base_url}/v1", api_key="unused", max_retries=0).embeddings.create(
            model=EMB, input="hello"
        )

    # `make run` again: the same key, not a new one.
    again = _deploy(config, pool.run_dir)
    assert key_file.read_text().strip() == key and f"API key         : {key}" in again and "new," not in again
