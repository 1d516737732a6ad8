"""Training settings in one dataclass, saved in every checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from hatc.errors import HatcError

SCHEDULES = ("inverse_sqrt", "cosine")


@dataclass
class TrainConfig:
    max_updates: int | None = None  # total over all resumes
    minutes: float | None = None  # wall-clock limit for this invocation (a resume given no rule: what is left)
    max_tokens: int = 4096  # padded tokens per micro-batch (per worker)
    update_freq: int = 1  # micro-batches accumulated per update
    lr: float = 1e-3  # peak learning rate
    warmup_updates: int = 1000  # linear warm-up from warmup_init_lr
    warmup_init_lr: float = 1e-7
    schedule: str = "inverse_sqrt"  # HAT: inverse_sqrt (IWSLT), cosine (WMT, over max_updates)
    min_lr: float = 1e-6  # floor of the cosine schedule
    label_smoothing: float = 0.1
    dropout: float = 0.1  # HAT: 0.3 for WMT; Multi30k-size models do better with less
    attention_dropout: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 0.0  # 0 = no clipping
    seed: int = 1
    validate_every: int = 0  # updates; 0 = at the end of every epoch
    save_every: int = 500  # updates between last.pt writes
    save_minutes: float = 10.0  # ... and at least this often
    valid_subset: int | None = None  # validate on the first N pairs only

    def validate(self) -> TrainConfig:
        if self.max_updates is None and self.minutes is None:
            raise HatcError("give --max-updates N or --minutes M (or both)")
        if self.schedule not in SCHEDULES:
            raise HatcError(f"unknown --schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.schedule == "cosine" and self.max_updates is None:
            raise HatcError("--schedule cosine decays over --max-updates; give it")
        for name in ("max_tokens", "update_freq"):
            if getattr(self, name) < 1:
                raise HatcError(f"--{name.replace('_', '-')} must be at least 1")
        return self

    def resumed(self, given: TrainConfig, minutes_left: float | None) -> TrainConfig:
        """These (a saved run's) settings for a resume, with the stopping rule ``given`` names.

        Only the stopping rule may change. ``--max-updates`` is the run's total: a new one
        replaces it, else it stays. ``--minutes`` is one invocation's limit: a new one applies;
        with neither flag given the run keeps its own budget, ``minutes_left`` of it.
        """
        if given.max_updates is None and given.minutes is None:
            return replace(self, minutes=minutes_left)
        return replace(self, max_updates=given.max_updates or self.max_updates, minutes=given.minutes)

    def lr_at(self, update: int) -> float:
        """Learning rate for update number ``update`` (1-based)."""
        if update <= self.warmup_updates:
            start = min(self.warmup_init_lr, self.lr)  # never warm up past the peak (lr 0 stays 0)
            return start + (self.lr - start) * update / self.warmup_updates
        if self.schedule == "inverse_sqrt":
            return self.lr * math.sqrt(self.warmup_updates / update)
        span = max(1, (self.max_updates or update) - self.warmup_updates)
        progress = min(1.0, (update - self.warmup_updates) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
