"""The scorer's options: a module of their own, so `stream-ml --help` need not import torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServeOptions:
    api_keys: tuple[str, ...] = ()
    auth: bool = True
    max_batch: int = 64
    max_queue: int = 2048
    deadline_ms: float = 50.0
    review_threshold: float = 0.5
    decline_threshold: float = 0.9
    redis_timeout_ms: float = 20.0
    degraded_ok: bool = True  # False: answer 503 when features cannot be read
    max_body_bytes: int = 64 * 1024
    rate_per_key: float = 5000.0  # requests per second per API key (token bucket)
    max_transactions_per_call: int = 256
    prediction_buffer: int = 10_000
    model_poll_s: float = 1.0  # how often the registry's stage pointers are read
    allow_feature_set_mismatch: bool = False
    shadow_queue: int = 16  # batches waiting for the shadow model; more are dropped and counted
    # torch's CPU threads: more than one spin between a small batch's operations, taking the core
    # that HTTP, Redis and the callers need (measured: 1.6 cores busy at 500 calls/s with 2)
    torch_threads: int = 1

    def decision(self, score: float) -> str:
        if score >= self.decline_threshold:
            return "decline"
        return "review" if score >= self.review_threshold else "approve"
