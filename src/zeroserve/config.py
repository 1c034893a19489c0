"""Typed configuration: one pydantic model per config object, validated at build time.

A Serve config (``serve_config.yaml``) lists one gateway application and one
application per model. Each model application's ``args`` is a :class:`ModelSpec`;
the gateway's is a :class:`GatewaySpec`. The application's name is the model's name
in the OpenAI API, so Serve itself keeps names unique; :func:`validate_serve_config`
checks a whole file with messages that name the model, the field and the value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zeroserve.settings import get_settings

__all__ = [
    "AutoscalingSpec",
    "ConfigError",
    "GatewaySpec",
    "ModelSpec",
    "Task",
    "VLLMOptions",
    "MODEL_BUILDER",
    "GATEWAY_BUILDER",
    "parse_model_spec",
    "parse_gateway_spec",
    "resolve_model_source",
    "validate_serve_config",
]

Task = Literal["embed", "classify", "generate"]
MODEL_BUILDER = "deployments.model:build"
GATEWAY_BUILDER = "deployments.gateway:build"

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ConfigError(ValueError):
    """A configuration is refused; the message names the model, field and value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Every model deployment's autoscaling policy (deployments/pool_policy.py), and Serve's own delay
# before a scale to zero: none, since the policy already waited for the model's idle delay (or its
# min_hold_s when the pool asked it to yield).
POOL_POLICY = "deployments.pool_policy:PoolPolicy"
POOL_YIELD_DELAY_S = 0.0


class AutoscalingSpec(_Strict):
    """Ray Serve autoscaling, with defaults that make scale-to-zero real.

    Ray's own defaults (30 s to scale up, 600 s to scale down) suit long-lived
    services; a shared pool wants a model off the GPU soon after its last call.
    """

    min_replicas: int = Field(default=0, ge=0)
    initial_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(default=0.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)
    downscale_to_zero_delay_s: float = Field(default=300.0, ge=0)
    look_back_period_s: float = Field(default=10.0, gt=0)
    metrics_interval_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) is outside "
                f"[min_replicas={self.min_replicas}, max_replicas={self.max_replicas}]"
            )
        return self

    def to_ray(self) -> dict[str, Any]:
        """The ``autoscaling_config`` dict for a Serve deployment."""
        return self.model_dump(exclude_none=True)


class VLLMOptions(_Strict):
    """Options for ``engine: vllm``; everything else vLLM decides (its own defaults)."""

    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Override of the budget derived from gpu_fraction; must not exceed it.",
    )
    quantization: str | None = Field(default=None, description="e.g. awq, gptq, fp8")
    max_num_seqs: int | None = Field(default=None, gt=0)
    enforce_eager: bool | None = Field(default=None, description="Default: true on CPU only.")
    enable_prefix_caching: bool | None = None
    stream_interval: int | None = Field(
        default=None,
        gt=0,
        description="Tokens per streamed chunk (vLLM's --stream-interval; vLLM's default 1). "
        "Raise it where host CPUs are scarce: each chunk crosses two Ray hops.",
    )
    stream_batch_ms: float = Field(
        default=20.0,
        ge=0,
        le=1000,
        description="A stream's text is sent at most once per this many ms, with every token that "
        "arrived meanwhile (the first token at once). Each message crosses the Ray hops to the "
        "client; tokens faster than this share one. 0: every token alone as soon as it exists.",
    )
    cpu_kv_cache_space_gb: float = Field(
        default=1.0, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE)."
    )
    multiprocessing: bool | None = Field(
        default=None,
        description="Engine core in its own process. Default: no on CPU (3 s vs 18-64 s to "
        "start), vLLM's default (yes) on GPUs.",
    )


class ModelSpec(_Strict):
    """One model: what it is, how it runs, what it may be asked for."""

    task: Task = Field(description="embed, classify or generate")
    engine: Literal["transformers", "vllm"] = "transformers"
    model: str = Field(
        min_length=1,
        description="A hub id (org/name) or a local folder (absolute, or relative with ./).",
    )
    gpu_fraction: float = Field(default=0.25, gt=0, le=1)
    num_cpus: float = Field(default=0.25, gt=0)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_model_len: int | None = Field(default=None, gt=0, description="Context length cap; the model's own when unset.")
    max_tokens_cap: int = Field(default=512, gt=0, description="Largest max_tokens accepted.")
    max_n: int = Field(default=4, gt=0, le=16, description="Largest n (choices) accepted.")
    max_batch_size: int = Field(default=8, gt=0)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    max_ongoing_requests: int = Field(default=16, gt=0)
    max_queued_requests: int = Field(default=64, gt=0)
    cold_start_timeout_s: float | None = Field(
        default=None, gt=0, description="Overrides the gateway's bound on waiting for a wake."
    )
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    priority: int = Field(default=0, description="In a full pool, lower priorities yield their slice first.")
    pinned: bool = Field(default=False, description="Never yields its slice to another model.")
    min_hold_s: float = Field(
        default=10.0, ge=0, description="Least idle time before the model may yield (a woken model serves first)."
    )
    warm: bool = Field(
        default=True,
        description="Keep the model built in host memory between wakes (the warm tier): a wake "
        "attaches to it instead of building it. vLLM models on a GPU build in the replica.",
    )
    vllm: VLLMOptions | None = None
    weights_gb: float | None = Field(
        default=None,
        gt=0,
        description="Size of the weights, for `zeroserve plan` where the files are not on the machine.",
    )
    kv_bytes_per_token: int | None = Field(
        default=None,
        gt=0,
        description="KV cache bytes per token (2 x layers x kv_heads x head_dim x dtype bytes), for "
        "`zeroserve plan` where config.json is not on the machine.",
    )
    description: str = ""

    @model_validator(mode="after")
    def _check_engine_options(self) -> ModelSpec:
        if self.vllm is not None and self.engine != "vllm":
            raise ValueError("'vllm' options are only allowed with engine: vllm")
        util = self.vllm.gpu_memory_utilization if self.vllm else None
        if util is not None and util > self.gpu_fraction:
            raise ValueError(
                f"vllm.gpu_memory_utilization ({util}) is above gpu_fraction "
                f"({self.gpu_fraction}): the engine would take memory promised to its neighbours"
            )
        return self

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if value.startswith(("/", "./", "../", "~")):
            return value
        if not HUB_ID_RE.match(value) or ".." in value:
            raise ValueError("must be a hub id such as 'org/name' or a local path starting with '/' or './'")
        return value

    @property
    def uses_warm_tier(self) -> bool:
        """Whether its replicas attach to a warm copy (``warm``; a vLLM copy refuses on a GPU)."""
        return self.warm

    @property
    def stream_batch_s(self) -> float:
        """How far apart a stream's messages go at least (``vllm.stream_batch_ms``; 0 elsewhere)."""
        return self.vllm.stream_batch_ms / 1000 if self.vllm else 0.0

    @property
    def never_yields(self) -> bool:
        """Pinned, or held awake by ``min_replicas``: the pool never asks it for its slice."""
        return self.pinned or self.autoscaling.min_replicas >= 1

    def ray_autoscaling(self) -> dict[str, Any]:
        """The ``autoscaling_config`` of the model's deployment: the pool's policy owns the idle
        delay, because Serve's own delays wrap a custom policy and it cannot shorten them."""
        cfg = self.autoscaling.to_ray()
        idle_to_zero_s = cfg["downscale_to_zero_delay_s"]
        cfg["downscale_to_zero_delay_s"] = POOL_YIELD_DELAY_S
        cfg["policy"] = {
            "policy_function": POOL_POLICY,
            "policy_kwargs": {
                "idle_to_zero_s": idle_to_zero_s,
                "min_hold_s": self.min_hold_s,
                "pinned": self.never_yields,
            },
        }
        return cfg

    @property
    def serves_openai(self) -> bool:
        """Whether the engine has its own OpenAI layer, which the gateway forwards requests to (vLLM)."""
        return self.engine == "vllm"

    @property
    def is_local(self) -> bool:
        return self.model.startswith(("/", "./", "../", "~"))


class TierSpec(_Strict):
    """What one tier of API keys may use."""

    daily_gpu_seconds: float = Field(gt=0, description="GPU-seconds per UTC day (engine time x fraction).")
    requests_per_minute: int = Field(default=60, gt=0)
    max_concurrent: int = Field(default=4, gt=0)
    priority: int = Field(default=0, ge=0, le=100, description="Higher is served first under contention.")
    models: list[str] | None = Field(default=None, description="Models this tier may use (default: all).")


# Where API keys and charges live when nothing else is said (one machine).
DEFAULT_LEDGER_PATH = "~/.zeroserve/ledger.sqlite3"


class LedgerSpec(_Strict):
    backend: Literal["sqlite", "redis"] = "sqlite"
    path: str = Field(default=DEFAULT_LEDGER_PATH, description="SQLite file (one machine).")
    url: str | None = Field(default=None, description="redis://host:port/db (several nodes).")
    journal_dir: str | None = Field(
        default=None,
        description="Local folder where charges wait while the ledger is unreachable (default: beside the "
        "SQLite file, or ~/.zeroserve/journal for Redis).",
    )

    @model_validator(mode="after")
    def _check(self) -> LedgerSpec:
        if self.backend == "redis" and not self.url:
            raise ValueError("ledger.backend redis needs ledger.url")
        return self


class AuthSpec(_Strict):
    """API keys and quotas. Off by default (a local demo); keys are made with `zeroserve keys`."""

    enabled: bool = False
    tiers: dict[str, TierSpec] = Field(default_factory=dict)
    ledger: LedgerSpec = Field(default_factory=LedgerSpec)
    aging_s: float = Field(default=10.0, gt=0, description="Waiting this long raises a request one priority level.")
    key_cache_s: float = Field(
        default=300.0,
        gt=0,
        description="While the ledger is unreachable, a key the ledger confirmed within this many seconds is "
        "still accepted (so is one revoked meanwhile); other keys get a 503.",
    )

    @model_validator(mode="after")
    def _check(self) -> AuthSpec:
        if self.enabled and not self.tiers:
            raise ValueError("auth.enabled needs at least one tier")
        return self


class GatewaySpec(_Strict):
    """The gateway application's args."""

    num_cpus: float = Field(default=0.25, gt=0)
    num_replicas: int = Field(default=1, ge=1)
    cold_start_timeout_s: float = Field(
        default=180.0, gt=0, description="Longest a request waits for a cold model to wake."
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest a request waits once its model is awake."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest a request's body may take to arrive (then 408)."
    )
    max_slow_bodies: int = Field(
        default=64,
        gt=0,
        description="Requests per gateway replica whose body is still arriving after a second; more are "
        "refused (503): slow uploads cannot hold every connection.",
    )
    max_inflight_requests: int = Field(
        default=512, gt=0, description="Requests in the gateway at once before it sheds load."
    )
    max_inflight_per_model: int = Field(
        default=128, gt=0, description="Requests for one model at once before it sheds load."
    )
    retry_after_s: int = Field(default=5, gt=0)
    shutdown_grace_s: float = Field(
        default=60.0, gt=0, description="How long a stopping gateway replica may take to finish its requests."
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    discovery_ttl_s: float = Field(default=2.0, ge=0)
    keepalive_s: float = Field(
        default=5.0, gt=0, description="SSE comment interval while a streamed request waits for a cold model."
    )
    metrics: bool = Field(default=True, description="Export Prometheus metrics through Ray's pipeline.")
    host_cache_gb: float = Field(
        default=16.0,
        gt=0,
        description="Host memory per node for models kept warm between wakes; the least recently "
        "used warm copies with no replica leave first.",
    )
    evict_idle_models: bool = Field(
        default=True,
        description="When a cold model fits on no GPU, ask idle models to yield their slices at once "
        "(the pool). False: the request waits until a model scales to zero after its own idle delay.",
    )
    auth: AuthSpec = Field(default_factory=AuthSpec)


def _format_errors(owner: str, err: ValidationError, args: dict[str, Any]) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        value = item.get("input")
        if item["type"] == "extra_forbidden":
            lines.append(f"{owner}: unknown field '{loc}' (value {value!r})")
        elif item["type"] == "missing":
            lines.append(f"{owner}: field '{loc}' is required")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{owner}: field '{loc or '(spec)'}' = {value!r}: {msg}")
    return "; ".join(lines)


def parse_model_spec(args: dict[str, Any] | None, name: str | None = None) -> ModelSpec:
    """Validate a model application's args.

    Raises:
        ConfigError: naming the model (when known), the field and the value.
    """
    owner = f"model '{name}'" if name else "model"
    try:
        return ModelSpec.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(owner, err, args or {})) from None


def parse_gateway_spec(args: dict[str, Any] | None) -> GatewaySpec:
    """Validate the gateway application's args (raises :class:`ConfigError`)."""
    try:
        return GatewaySpec.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(_format_errors("gateway", err, args or {})) from None


def resolve_model_source(spec: ModelSpec) -> str:
    """The string to hand to ``from_pretrained``: an absolute path or a hub id."""
    if not spec.is_local:
        return spec.model
    path = Path(spec.model).expanduser()
    if not path.is_absolute():
        path = get_settings().home / path
    return str(path.resolve())


def validate_serve_config(config: dict[str, Any]) -> tuple[GatewaySpec, dict[str, ModelSpec]]:
    """Check a whole Serve config file the way the builders will, plus cross-app rules.

    Returns:
        The gateway spec and the model specs by model name.

    Raises:
        ConfigError: every problem found, one per line.
    """
    problems: list[str] = []
    apps = config.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ConfigError("the config has no 'applications' list")
    gateway: GatewaySpec | None = None
    models: dict[str, ModelSpec] = {}
    seen: set[str] = set()
    for app in apps:
        name = str(app.get("name", ""))
        if name in seen:
            problems.append(f"model '{name}': the name is used by two applications")
            continue
        seen.add(name)
        import_path = app.get("import_path")
        if import_path == GATEWAY_BUILDER:
            if gateway is not None:
                problems.append(f"application '{name}': a second gateway")
            try:
                gateway = parse_gateway_spec(app.get("args"))
            except ConfigError as err:
                problems.append(str(err))
            if app.get("route_prefix", "/") != "/":
                problems.append(f"gateway '{name}': route_prefix must be '/'")
        elif import_path == MODEL_BUILDER:
            if not MODEL_NAME_RE.match(name):
                problems.append(
                    f"model '{name}': the application name is the model's API name and must "
                    "match [A-Za-z0-9][A-Za-z0-9._-]*"
                )
            if app.get("route_prefix", None) is not None:
                problems.append(
                    f"model '{name}': route_prefix = {app.get('route_prefix')!r}: models are "
                    "reached through the gateway; set route_prefix: null"
                )
            try:
                models[name] = parse_model_spec(app.get("args"), name)
            except ConfigError as err:
                problems.append(str(err))
        else:
            problems.append(
                f"application '{name}': import_path = {import_path!r}: expected "
                f"{GATEWAY_BUILDER!r} or {MODEL_BUILDER!r}"
            )
    if gateway is None and not any("gateway" in p for p in problems):
        problems.append(f"the config has no gateway application ({GATEWAY_BUILDER})")
    if problems:
        raise ConfigError("\n".join(problems))
    assert gateway is not None
    return gateway, models


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """Read a Serve config YAML, refusing duplicate keys (YAML would keep the last)."""

    class _NoDupLoader(yaml.SafeLoader):
        pass

    def _construct(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node)
            if key in out:
                raise ConfigError(f"{path}: key {key!r} appears twice (line {key_node.start_mark.line + 1})")
            out[key] = loader.construct_object(value_node, deep=True)
        return out

    _NoDupLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct)
    with open(path, encoding="utf-8") as f:
        data = yaml.load(f, Loader=_NoDupLoader)  # noqa: S506 - SafeLoader subclass
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a YAML mapping")
    return data
