"""Prometheus metrics, in a registry per app so several servers can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qserve_requests", "HTTP API requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("qserve_time_to_first_token_seconds", "Time to first token", buckets=_LAT, registry=r)
        self.itl = Histogram("qserve_inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
                             registry=r)
        self.e2e = Histogram("qserve_request_latency_seconds", "End-to-end request latency", buckets=_LAT, registry=r)
        self.prompt_tokens = Counter("qserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("qserve_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("qserve_requests_running", "Requests being generated", registry=r)
        self.waiting = Gauge("qserve_requests_waiting", "Requests waiting for a slot", registry=r)
        self.weight_bytes = Gauge("qserve_weight_bytes", "Resident weight bytes", registry=r)
        self.kv_bytes = Gauge("qserve_kv_cache_bytes", "Allocated KV cache bytes", registry=r)
        self.quant = Gauge("qserve_model_info", "Served model (value 1), labelled by quantization method",
                           ["model", "quant_method", "engine", "dtype"], registry=r)
        self.budget = Gauge("qserve_memory_budget_bytes", "Memory budget in force (0: none)", registry=r)
        self.compiled = Gauge("qserve_decode_step_compiled",
                              "1 while the embedded engine decodes through its compiled step, 0 when eager",
                              registry=r)
        self.blocks = Gauge("qserve_bitstack_blocks", "BitStack blocks loaded (0: not a BitStack model)", registry=r)
        self.resizes = Counter("qserve_resizes", "Memory-budget changes applied", registry=r)
        self.resize_seconds = Histogram("qserve_resize_seconds", "Budget change to new size serving",
                                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.aborted = Counter("qserve_requests_aborted", "Requests aborted by client disconnect", registry=r)
