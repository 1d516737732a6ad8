"""Search fitness: validation loss of the SuperTransformer with inherited weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hatc.arch import Architecture, arch_key
from hatc.data.batching import collate, token_batches
from hatc.data.datadir import ParallelSplit
from hatc.elastic.supernet import SuperTransformer
from hatc.train.loop import label_smoothed_loss


class SupernetValidLoss:
    """Per-token NLL on a fixed validation subset, cached per architecture.

    The batches are built once; the supernet is switched to each architecture
    in eval mode (no dropout), so a score is a deterministic function of the arch.
    """

    def __init__(
        self,
        supernet: SuperTransformer,
        split: ParallelSplit,
        max_tokens: int = 4096,
        on_scored: Callable[[int], None] = lambda _: None,
    ):
        self.supernet = supernet.eval()
        src_lens, tgt_lens = split.lengths()
        self.batches = [
            collate([split.src[i] for i in idx], [split.tgt[i] for i in idx])
            for idx in token_batches(src_lens, tgt_lens, max_tokens, seed=0, epoch=0)
        ]
        self.cache: dict[str, float] = {}  # arch JSON -> loss; saved with a search so resume reuses it
        self.on_scored = on_scored

    @torch.no_grad()
    def score(self, arch: Architecture) -> float:
        key = arch_key(arch)
        if key not in self.cache:
            self.supernet.set_active_subnet(arch)
            nll_sum, ntokens = 0.0, 0
            for batch in self.batches:
                _, nll = label_smoothed_loss(self.supernet(batch.src, batch.prev), batch.target, 0.0)
                nll_sum, ntokens = nll_sum + nll.item(), ntokens + batch.ntokens
            self.cache[key] = nll_sum / ntokens
            self.on_scored(len(self.cache))
        return self.cache[key]

    def score_many(self, archs: Sequence[Architecture]) -> list[float]:
        return [self.score(a) for a in archs]
