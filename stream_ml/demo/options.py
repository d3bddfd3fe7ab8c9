"""The demo's options: a module of their own, so `stream-ml --help` imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class DemoOptions:
    output: Path = Path("stream-ml-demo")
    duration_s: float = 60.0
    rate: float = 200.0  # payments per wall second
    time_scale: float = 60.0  # event-time seconds per wall second
    history: int = 20_000  # payments published before the live part
    cards: int = 5_000
    merchants: int = 500
    fraud_rate: float = 0.01
    label_delay_s: float = 300.0  # of event time
    shift: str = "amount=3"
    shift_at: float = 0.5  # share of --duration
    retrain_at: float = 0.6  # share of --duration
    window_events: int = 2_000
    reference_rows: int = 2_000
    status_every_s: float = 2.0
    seed: int = 7

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.rate <= 0 or self.time_scale <= 0:
            raise ValueError("--duration, --rate and --time-scale must be above 0")
        if not 0 <= self.shift_at <= 1 or not 0 <= self.retrain_at <= 1:
            raise ValueError("--shift-at and --retrain-at are shares of --duration, between 0 and 1")
        if self.history < 0:
            raise ValueError(f"--history must be 0 or more, got {self.history}")
