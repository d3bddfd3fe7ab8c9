"""Training options: a module of their own, so `stream-ml --help` need not import torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TrainOptions:
    """Training parameters; every field but ``log`` is recorded with the model."""

    epochs: int = 20
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden: tuple[int, int] = (128, 64)
    seed: int = 0
    patience: int = 3  # epochs without a better validation PR AUC before stopping
    val_fraction: float = 0.2
    top_k: int = 20  # reviews a day: the k of precision_at_top_k_per_day
    # Weight of a fraud in the loss. None: sqrt(legitimate / fraud), which keeps the rare class
    # visible without the gradient noise of the full ratio (≈100 at 1 % fraud).
    pos_weight: float | None = None
    device: str | None = None  # None: CUDA when available, else CPU
    # CPU threads while training. The batches of this small MLP are too small to split well: one
    # thread was 3-4x faster than two on a busy 2-core machine, and it makes the weights for a seed
    # independent of the machine's core count.
    threads: int = 1
    progress: bool = True  # a tqdm bar per epoch, shown only on a terminal
    log: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        if min(self.epochs, self.batch_size, self.patience, self.top_k, self.threads) < 1:
            raise ValueError("epochs, batch size, patience, top-k and threads must be at least 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val fraction must be between 0 and 1 (exclusive), not {self.val_fraction}")
        if self.lr <= 0 or (self.pos_weight is not None and self.pos_weight <= 0):
            raise ValueError("learning rate and pos weight must be positive")
        if len(self.hidden) != 2 or min(self.hidden) < 1:
            raise ValueError(f"hidden must be two layer sizes, e.g. 128,64, not {self.hidden}")
