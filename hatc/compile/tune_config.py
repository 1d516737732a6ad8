"""What ``hatc tune`` tunes for, and how hard: its own small module, so that planning
(``hatc.compile.workloads``) and tuning (``hatc.compile.tuning``) both read it without
importing each other."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TRIALS_PER_TASK = 32
DEFAULT_VOCAB = 8000  # hatc's data default (``hatc data prepare``)


@dataclass(frozen=True)
class TuneConfig:
    """What to tune for, and how hard.

    ``trials`` is the total measured-trial budget over all workloads, split by
    each workload's measured share of the latency (its plain loops' time x calls
    per sentence; ``hatc.compile.trial_budget``), with a floor of a few each: a
    workload without a measured trial would stay untuned and every build using it
    would be refused.
    """

    buckets: tuple[int, ...]  # source length buckets (hatc.runtime.signature.BUCKETS)
    beams: tuple[int, ...]  # decoder batch sizes
    vocab_size: int = DEFAULT_VOCAB
    pad_idx: int = 0
    max_positions: int = 1024
    trials: int | None = None  # None: DEFAULT_TRIALS_PER_TASK x the number of workloads
    seed: int = 0
    precision: str = "fp32"  # the weights of the builds to tune for (hatc.runtime.quantization)
