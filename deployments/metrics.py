"""zeroserve's Prometheus metrics, exported through Ray's own metrics pipeline.

Ray prefixes every application metric with ``ray_``, so they appear beside Ray's own on
each node's metrics export port and in the dashboard's Grafana views
(``ray_zeroserve_requests_total``...). Label values are bounded: configured model names
(``_unknown`` for anything else), fixed route names, status codes, states.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from zeroserve.gateway.registry import ModelState

__all__ = ["GatewayMetrics", "ReplicaMetrics", "STATES"]

STATES = tuple(state.value for state in ModelState)
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
COLD_BUCKETS = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]


class GatewayMetrics:
    """The gateway's observer: one Ray metric per event kind."""

    def __init__(self) -> None:
        self._requests = Counter(
            "zeroserve_requests_total",
            "Requests answered by the gateway, by model, route and status code.",
            tag_keys=("model", "route", "status"),
        )
        self._latency = Histogram(
            "zeroserve_request_duration_seconds",
            "End-to-end request latency at the gateway.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("model", "route"),
        )
        self._ttft = Histogram(
            "zeroserve_time_to_first_token_seconds",
            "Time to the first streamed token.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("model",),
        )
        self._tpot = Histogram(
            "zeroserve_time_per_output_token_seconds",
            "Mean time per output token after the first.",
            boundaries=TOKEN_BUCKETS,
            tag_keys=("model",),
        )
        self._tokens = Counter("zeroserve_tokens_total", "Prompt and completion tokens.", tag_keys=("model", "kind"))
        self._inflight = Gauge(
            "zeroserve_inflight_requests", "Requests in the gateway per model (its queue depth).", tag_keys=("model",)
        )
        self._cold_starts = Counter(
            "zeroserve_cold_starts_total", "Wakes of a model from zero replicas.", tag_keys=("model",)
        )
        self._journal = Gauge(
            "zeroserve_ledger_journal_charges",
            "Charges this gateway replica keeps on disk because the key ledger could not take them; "
            "above 0 means the ledger is (or was just) unreachable.",
        )
        self._evictions = Counter(
            "zeroserve_evictions_total",
            "Models asked to yield their GPU slice, by model, the model it yields to, and why: "
            "waiting_request (a request waits to wake a model that fits nowhere) or pending_replica "
            "(a woken model's replica that Ray cannot place).",
            tag_keys=("model", "for_model", "reason"),
        )
        self._rewakes = Counter(
            "zeroserve_pool_rewakes_total",
            "Wakes of a model within a minute of its eviction (the pool thrashing).",
            tag_keys=("model",),
        )
        self._slot_wait = Histogram(
            "zeroserve_pool_slot_wait_seconds",
            "Time a request to a cold model waited for a GPU slice before its wake began.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("model",),
        )
        self._cold_start_seconds = Histogram(
            "zeroserve_cold_start_duration_seconds",
            "Time from the first request to a cold model to its answer.",
            boundaries=COLD_BUCKETS,
            tag_keys=("model",),
        )
        self._state = Gauge(
            "zeroserve_model_state",
            "1 for the model's current state (cold, starting, ready, failed).",
            tag_keys=("model", "state"),
        )
        self._replicas = Gauge("zeroserve_model_replicas", "Running replicas per model.", tag_keys=("model",))
        self._node_gpus = Gauge("zeroserve_node_gpus", "GPUs of each live node.", tag_keys=("node",))
        self._node_used = Gauge(
            "zeroserve_node_gpus_allocated",
            "Sum of the GPU fractions of the model replicas on each node.",
            tag_keys=("node",),
        )

    def request(self, model: str, route: str, status: int, seconds: float) -> None:
        self._requests.inc(1, {"model": model, "route": route, "status": str(status)})
        self._latency.observe(seconds, {"model": model, "route": route})

    def first_token(self, model: str, seconds: float) -> None:
        self._ttft.observe(seconds, {"model": model})

    def per_output_token(self, model: str, seconds: float) -> None:
        self._tpot.observe(seconds, {"model": model})

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self._tokens.inc(prompt, {"model": model, "kind": "prompt"})
        if completion:
            self._tokens.inc(completion, {"model": model, "kind": "completion"})

    def inflight(self, model: str, count: int) -> None:
        self._inflight.set(count, {"model": model})

    def cold_start(self, model: str, seconds: float) -> None:
        self._cold_starts.inc(1, {"model": model})
        self._cold_start_seconds.observe(seconds, {"model": model})

    def eviction(self, victim: str, for_model: str, reason: str) -> None:
        self._evictions.inc(1, {"model": victim, "for_model": for_model, "reason": reason})

    def slot_wait(self, model: str, seconds: float) -> None:
        self._slot_wait.observe(seconds, {"model": model})

    def rewake(self, model: str) -> None:
        self._rewakes.inc(1, {"model": model})

    def ledger_journal(self, pending: int) -> None:
        self._journal.set(pending)

    def pool(self, allocated: dict[str, float], capacity: dict[str, float]) -> None:
        for node in set(allocated) | set(capacity):
            self._node_gpus.set(capacity.get(node, 0.0), {"node": node})
            self._node_used.set(allocated.get(node, 0.0), {"node": node})

    def states(self, states: dict[str, tuple[str, int]]) -> None:
        for model, (state, replicas) in states.items():
            for s in STATES:
                self._state.set(1 if s == state else 0, {"model": model, "state": s})
            self._replicas.set(replicas, {"model": model})


class ReplicaMetrics:
    """A model replica's own figures: GPU-seconds used and start-up phases."""

    def __init__(self, model: str) -> None:
        self.tags = {"model": model}
        self._gpu_seconds = Counter(
            "zeroserve_gpu_seconds_total",
            "Seconds a replica's engine was busy with at least one request, times its GPU fraction.",
            tag_keys=("model",),
        )
        self._load = Histogram(
            "zeroserve_replica_start_duration_seconds",
            "Replica start-up by phase (import, weights, total).",
            boundaries=COLD_BUCKETS,
            tag_keys=("model", "phase"),
        )

    def gpu_seconds(self, value: float) -> None:
        if value > 0:
            self._gpu_seconds.inc(value, self.tags)

    def started(self, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self._load.observe(seconds, {**self.tags, "phase": phase})
