"""The router's Prometheus metrics (served at ``/metrics``), in one registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("p2pkv_router_requests", "Requests answered, by instance, "
                                "role and outcome", ["instance", "role", "outcome"], registry=r)
        self.choices = Counter("p2pkv_router_choices", "Routing decisions by reason "
                               "(cache, load, spread; planner: local, pull, recompute, "
                               "reroute)", ["role", "reason"], registry=r)
        self.retries = Counter("p2pkv_router_retries", "Attempts retried elsewhere after an "
                               "instance failed", ["instance"], registry=r)
        self.failed = Counter("p2pkv_router_failed", "Requests no instance could answer",
                              registry=r)
        self.prompt_tokens = Counter("p2pkv_router_prompt_tokens", "Prompt tokens routed",
                                     ["instance"], registry=r)
        self.cached_tokens = Counter("p2pkv_router_cached_tokens", "Prompt tokens the chosen "
                                     "instance held when chosen", ["instance"], registry=r)
        self.score = Gauge("p2pkv_router_last_score", "Each candidate's score at the last "
                           "decision it took part in", ["instance"], registry=r)
        self.expected_ttft = Gauge("p2pkv_router_expected_ttft_seconds", "With the planner: "
                                   "each candidate's expected time to first token at the last "
                                   "decision it took part in", ["instance"], registry=r)
        self.in_flight = Gauge("p2pkv_router_in_flight", "Requests in flight",
                               ["instance"], registry=r)
        self.up = Gauge("p2pkv_router_instance_up", "1 while the instance is in rotation",
                        ["instance", "role"], registry=r)
        self.prefill_s = Histogram("p2pkv_router_prefill_seconds", "Prefill step of a "
                                   "disaggregated request", registry=r)
        self.publish_wait_s = Histogram("p2pkv_router_publish_wait_seconds", "Wait for the "
                                        "prefill's chunks to be visible in the directory",
                                        registry=r)
        self.publish_timeouts = Counter("p2pkv_router_publish_wait_timeouts", "Prefills whose "
                                        "publish was not seen before the deadline", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
