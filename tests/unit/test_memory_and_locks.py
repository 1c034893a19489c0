from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from zeroserve.config import ConfigError, ModelSpec, parse_model_spec
from zeroserve.engines.vllm_engine import vllm_cli_args
from zeroserve.locks import gpu_start_lock
from zeroserve.memory import GIB, vllm_memory_utilization

A100_80 = 80 * GIB
A100_40 = 40 * GIB


def test_budget_is_the_share_minus_one_cuda_context() -> None:
    # 0.25 of 80 GiB = 20 GiB; minus 1.25 GiB of context = 18.75 GiB = 0.2344 of the card.
    assert vllm_memory_utilization(0.25, A100_80) == pytest.approx(0.2343, abs=1e-4)
    assert vllm_memory_utilization(1.0, A100_40) == pytest.approx(1 - 1.25 / 40, abs=1e-4)


def test_four_quarter_budgets_fit_with_every_context() -> None:
    util = vllm_memory_utilization(0.25, A100_40)
    assert 4 * (util * A100_40 + 1.25 * GIB) <= A100_40


def test_override_is_checked_against_the_share() -> None:
    assert vllm_memory_utilization(0.5, A100_80, override=0.4) == 0.4
    with pytest.raises(ConfigError, match=r"0.6 is above its gpu_fraction 0.5"):
        vllm_memory_utilization(0.5, A100_80, override=0.6, model="qwen")


def test_a_share_too_small_for_a_context_is_refused() -> None:
    with pytest.raises(ConfigError, match="model 'tiny': its 0.03 share of a 42.9 GB GPU"):
        vllm_memory_utilization(0.03, A100_40, model="tiny")


def test_config_refuses_override_above_fraction_and_options_on_other_engines() -> None:
    with pytest.raises(ConfigError, match="above gpu_fraction"):
        parse_model_spec(
            {
                "task": "generate",
                "engine": "vllm",
                "model": "org/m",
                "gpu_fraction": 0.25,
                "vllm": {"gpu_memory_utilization": 0.3},
            },
            "m",
        )
    with pytest.raises(ConfigError, match="only allowed with engine: vllm"):
        parse_model_spec({"task": "generate", "model": "org/m", "vllm": {}}, "m")


def test_vllm_cli_args_on_cpu_and_gpu() -> None:
    spec = ModelSpec(task="generate", engine="vllm", model="./m", max_model_len=256)
    cpu = vllm_cli_args(spec, "tiny", "/abs/m", cuda=False, total_bytes=None)
    assert cpu[:4] == ["--model", "/abs/m", "--served-model-name", "tiny"]
    assert "--enforce-eager" in cpu and cpu[cpu.index("--dtype") + 1] == "float32"
    assert "--gpu-memory-utilization" not in cpu
    gpu = vllm_cli_args(spec, "tiny", "/abs/m", cuda=True, total_bytes=A100_80)
    assert gpu[gpu.index("--gpu-memory-utilization") + 1] == "0.2343"
    assert "--enforce-eager" not in gpu and gpu[gpu.index("--dtype") + 1] == "auto"
    emb = vllm_cli_args(ModelSpec(task="embed", engine="vllm", model="./e"), "e", "/e", False, None)
    assert emb[emb.index("--runner") + 1] == "pooling" and emb[emb.index("--convert") + 1] == "embed"
    assert "--stream-interval" not in cpu  # vLLM's own default unless the config says


def test_vllm_options_reach_vllms_own_parser() -> None:
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    spec = ModelSpec(
        task="generate",
        engine="vllm",
        model="./m",
        vllm={"stream_interval": 4, "max_num_seqs": 8, "enable_prefix_caching": False},
    )
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_cli_args(spec, "m", "/abs/m", False, None))
    assert (args.stream_interval, args.max_num_seqs, args.enable_prefix_caching) == (4, 8, False)
    with pytest.raises(ValidationError):
        ModelSpec(task="generate", engine="vllm", model="./m", vllm={"stream_interval": 0})


def test_start_lock_serializes_and_survives_a_killed_holder(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import sys
        from zeroserve.locks import gpu_start_lock
        with gpu_start_lock("GPU-abc"):
            print("held", flush=True)
            sys.stdin.readline()  # held until the test kills this process
    """),
        ],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    import zeroserve.locks as locks

    old = locks.LOCK_DIR
    locks.LOCK_DIR = tmp_path / "zeroserve-locks"
    try:
        with pytest.raises(TimeoutError, match="GPU-abc"):
            with gpu_start_lock("GPU-abc", timeout_s=0.5, poll_s=0.05):
                pass
        holder.send_signal(signal.SIGKILL)  # a replica crashing mid-start
        holder.wait()
        # Freed by the crash: taken at once, not after the holder's timeout (TimeoutError otherwise).
        with gpu_start_lock("GPU-abc", timeout_s=30, poll_s=0.05):
            pass
        with gpu_start_lock("GPU-other", timeout_s=0.5):
            pass
    finally:
        locks.LOCK_DIR = old
        holder.kill()
