"""The ``zeroserve`` command on configs and files that miss a piece: one clear line and a
non-zero exit, never a traceback (no Ray: nothing here reaches a cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from zeroserve.cli import main

GATEWAY = """\
applications:
  - name: gateway
    route_prefix: /
    import_path: deployments.gateway:build
    args:
      auth:
        enabled: true
        ledger: {{path: {ledger}}}
        tiers:
          free: {{daily_gpu_seconds: 10}}
"""

MODEL_ONLY = """\
applications:
  - name: m
    import_path: deployments.model:build
    route_prefix: null
    args: {task: embed, model: ./models/all-MiniLM-L6-v2}
"""

MALFORMED = {
    "no-gateway": MODEL_ONLY,
    "not-yaml": "applications: [\n",
    "no-applications": "foo: 1\n",
    "applications-not-a-list": "applications: 5\n",
    "application-not-a-mapping": "applications: ['x', 3]\n",
    "not-a-mapping": "- a\n- b\n",
    "empty-file": "",
    "gateway-args-not-a-mapping": (
        "applications:\n  - name: gateway\n    import_path: deployments.gateway:build\n    args: [1, 2]\n"
    ),
}


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)  # an exception here is the traceback a user would have seen
    out = capsys.readouterr()
    return code, out.out + out.err


def test_keys_with_a_config_that_has_no_gateway_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It was a StopIteration traceback: cli.py called next() without a default."""
    config = _write(tmp_path, MODEL_ONLY)
    code, out = _run(["keys", "list", "--config", config], capsys)
    assert code == 2
    assert "no gateway application" in out and config in out and "Traceback" not in out


def test_keys_with_a_gateway_config_uses_its_ledger_and_tiers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = tmp_path / "keys.db"
    config = _write(tmp_path, GATEWAY.format(ledger=ledger))
    code, out = _run(["keys", "create", "--config", config, "--tier", "free", "--name", "ci"], capsys)
    assert code == 0 and ledger.is_file()
    code, out = _run(["keys", "create", "--config", config, "--tier", "gold"], capsys)
    assert code == 2 and "not in" in out
    code, out = _run(["keys", "list", "--config", config], capsys)
    assert code == 0 and "free" in out and "active" in out


@pytest.mark.parametrize("command", ["keys", "validate", "plan", "deploy"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_config_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, case: str
) -> None:
    config = _write(tmp_path, MALFORMED[case])
    argv = {
        "keys": ["keys", "list", "--config", config, "--ledger-path", str(tmp_path / "l.db")],
        "validate": ["validate", config],
        "plan": ["plan", config, "--gpus", "1xA100-80GB"],
        # Refused before any connection: the address is never reached.
        "deploy": ["deploy", config, "--address", "http://127.0.0.1:1", "--timeout", "1"],
    }[command]
    code, out = _run(argv, capsys)
    assert code != 0, out
    assert "Traceback" not in out and out.strip()


def test_a_missing_config_file_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.yaml")
    for argv in (
        ["keys", "list", "--config", missing],
        ["validate", missing],
        ["plan", missing],
        ["deploy", missing, "--address", "http://127.0.0.1:1"],
    ):
        code, out = _run(argv, capsys)
        assert code != 0 and "cannot read it" in out, argv


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ("- a\n", "not a YAML mapping"),
        ("available_nodes: [\n", "not valid YAML"),
        ("available_node_types: {gpu: [1, 2]}\n", "malformed available_node_types"),
    ],
    ids=["not-a-mapping", "not-yaml", "node-type-not-a-mapping"],
)
def test_plan_with_a_malformed_cluster_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cluster: str, message: str
) -> None:
    config = _write(tmp_path, GATEWAY.format(ledger=tmp_path / "l.db") + MODEL_ONLY.split("\n", 1)[1])
    code, out = _run(["plan", config, "--cluster", _write(tmp_path, cluster, "cluster.yaml")], capsys)
    assert code == 2 and message in out


def test_deploy_refuses_http_options_that_are_not_a_mapping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _write(tmp_path, "http_options: 5\n" + GATEWAY.format(ledger=tmp_path / "l.db"))
    code, out = _run(["deploy", config, "--address", "http://127.0.0.1:1"], capsys)
    assert code == 1 and "http_options" in out and "nothing deployed" in out


def test_deploy_to_an_unreachable_dashboard_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(tmp_path, GATEWAY.format(ledger=tmp_path / "l.db"))
    code, out = _run(["deploy", config, "--address", "http://127.0.0.1:1", "--timeout", "1"], capsys)
    assert code == 1 and "Failed to connect" in out and "unit tests must not start Ray" not in out


def test_keys_rotate_and_revoke_need_a_key_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("rotate", "revoke"):
        code, out = _run(["keys", action, "--ledger-path", str(tmp_path / "l.db")], capsys)
        assert code == 2 and "needs the KEY_ID" in out  # was "no key None"


def test_keys_with_a_ledger_it_cannot_open(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, out = _run(["keys", "list", "--ledger-path", str(blocker / "keys.db")], capsys)
    assert code == 1 and "cannot use the key ledger" in out
