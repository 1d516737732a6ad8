"""Search fitness: validation loss of the SuperTransformer with inherited weights.

An architecture's fitness is the per-token NLL of the supernet in that
SubTransformer's mode (eval: no dropout) on the first N validation pairs.
Computing it is nearly all of a search's time, so:

- the pairs are tokenized, padded and sorted by length into batches once
  (about 1024 padded tokens each: little padding, and logits that stay small);
- the output projection and the softmax run on real target tokens only, and the
  NLL is ``logsumexp(logits) - logit[target]`` (no log-softmax tensor);
- losses are computed with one torch thread each, by ``workers`` processes at
  once: on shared cores, single-thread processes keep going where the threads
  of one process wait for each other at every op; and a loss is the same number
  whichever process computed it;
- a scorer caches each architecture's loss (saved with a search), so nothing is
  scored twice.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hatc.arch import Architecture, arch_key
from hatc.data.batching import collate
from hatc.data.datadir import ParallelSplit
from hatc.data.subword import PAD
from hatc.elastic.supernet import SuperTransformer
from hatc.space import SearchSpace
from hatc.static import model as static

MAX_TOKENS = 1024  # padded tokens per batch: measured faster than 512, 2048 and 4096 on x86 (tiny, vocab 6000)

OnScored = Callable[[Architecture, float, int, int], None]  # (arch, loss, done, total) of what a call computes


@dataclass(frozen=True)
class ScoringBatch:
    src: Tensor  # (B, S) source ids, right-padded
    prev: Tensor  # (B, T) BOS + target without its EOS
    keep: Tensor  # (B, T) bool: the real target tokens
    target: Tensor  # (N,) the real target tokens, in ``keep``'s order
    ntokens: int  # N


def scoring_batches(split: ParallelSplit, max_tokens: int = MAX_TOKENS) -> list[ScoringBatch]:
    """The split in batches of similar-length pairs, at most ``max_tokens`` padded tokens
    (rows x longest side) each; sorted by target then source length, no randomness."""
    src_lens, tgt_lens = split.lengths()
    width = np.maximum(src_lens, tgt_lens)
    order = np.lexsort((src_lens, tgt_lens))
    batches, start = [], 0
    while start < len(order):
        end, longest = start + 1, int(width[order[start]])
        while end < len(order) and (end + 1 - start) * max(longest, int(width[order[end]])) <= max_tokens:
            longest = max(longest, int(width[order[end]]))
            end += 1
        idx = order[start:end]
        b = collate([split.src[i] for i in idx], [split.tgt[i] for i in idx])
        keep = b.target.ne(PAD)
        batches.append(ScoringBatch(b.src, b.prev, keep, b.target[keep], b.ntokens))
        start = end
    return batches


def valid_loss(supernet: SuperTransformer, arch: Architecture, batches: Sequence[ScoringBatch]) -> float:
    """Per-token NLL of ``arch`` (the supernet in its mode, which must be eval) on ``batches``."""
    supernet.set_active_subnet(arch)
    dim = arch.decoder_embed_dim
    nll, ntokens = 0.0, 0
    with torch.inference_mode():
        output_embed = supernet.embed_tokens.weight[:, :dim].contiguous()  # (V, D), shared with the input embedding
        for b in batches:
            hidden = decoder_states(supernet, b.src, b.prev)[b.keep]  # (N, D)
            logits = F.linear(hidden, output_embed)  # (N, V)
            target_logit = logits.gather(-1, b.target[:, None]).squeeze(-1)
            nll += (torch.logsumexp(logits, dim=-1) - target_logit).sum().item()
            ntokens += b.ntokens
    return nll / ntokens


def decoder_states(supernet: SuperTransformer, src: Tensor, prev: Tensor) -> Tensor:
    """The active subnet's last decoder states (B, T, D): ``SuperTransformer.forward`` without
    its output projection, which the loss applies to real target tokens only."""
    arch = supernet.arch
    enc = supernet.encode(src)
    x = supernet.embed(prev, arch.decoder_embed_dim)
    mask = static.causal_mask(prev.shape[1], x.device)
    for layer in supernet.decoder_layers[: arch.decoder_layers]:
        x = layer(x, mask, enc)
    return x


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block (every loss is computed so, in any process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class LossEngine:
    """Validation losses of architectures on the first n pairs, for each n in ``sizes``:
    in this process (``workers=1``) or in ``workers`` single-thread processes.

    Use as a context manager (or call ``close``) to end the worker processes.
    """

    def __init__(
        self, supernet: SuperTransformer, split: ParallelSplit, sizes: Sequence[int], workers: int = 1
    ) -> None:
        self.supernet = supernet.eval()
        self.length = len(split)
        self.sizes = sorted({self.size(n) for n in sizes})
        self.batches = {n: scoring_batches(split.subset(n)) for n in self.sizes}
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            state = {k: v.detach().cpu().numpy() for k, v in supernet.state_dict().items()}
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),  # fork is unsafe once torch runs threads
                initializer=_init_worker,
                initargs=(supernet.space, supernet.cfg, state, split.src, split.tgt, self.sizes),
            )
            for _ in range(workers):  # start them now: they load torch while the search samples
                self._pool.submit(_ready)

    def size(self, n: int) -> int:
        """The number of pairs scored for a subset of ``n`` (a shorter split is scored whole)."""
        return min(n, self.length)

    def compute(self, n: int, archs: Sequence[Architecture], on_each: Callable[[Architecture, float], None]) -> None:
        """Calls ``on_each(arch, loss)`` as each loss is computed (in any order)."""
        n = self.size(n)
        if self._pool is None:
            with one_thread():
                for arch in archs:
                    on_each(arch, valid_loss(self.supernet, arch, self.batches[n]))
            return
        futures: dict[Future, Architecture] = {self._pool.submit(_worker_loss, n, a.to_dict()): a for a in archs}
        try:
            for future in as_completed(futures):
                on_each(futures[future], future.result())
        finally:  # interrupted: drop what has not started
            for future in futures:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> LossEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SupernetValidLoss:
    """The search's scorer: loss on the first ``n`` validation pairs, cached per architecture."""

    def __init__(self, engine: LossEngine, n: int) -> None:
        self.engine, self.n = engine, engine.size(n)
        self.cache: dict[str, float] = {}  # arch_key -> loss; saved with a search so resume reuses it

    def score_many(self, archs: Sequence[Architecture], on_scored: OnScored | None = None) -> list[float]:
        """Losses of ``archs``; those not cached are computed, each reported to ``on_scored``."""
        missing = list({arch_key(a): a for a in archs if arch_key(a) not in self.cache}.values())
        done = [0]

        def store(arch: Architecture, loss: float) -> None:
            self.cache[arch_key(arch)] = loss
            done[0] += 1
            if on_scored is not None:
                on_scored(arch, loss, done[0], len(missing))

        self.engine.compute(self.n, missing, store)
        return [self.cache[arch_key(a)] for a in archs]


# ----- worker processes --------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(
    space: SearchSpace,
    cfg: static.ModelConfig,
    state: dict[str, np.ndarray],
    src: list[np.ndarray],
    tgt: list[np.ndarray],
    sizes: list[int],
) -> None:
    # Ctrl-C reaches the whole process group: the parent saves the search and ends the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    supernet = SuperTransformer.from_config(space, cfg)
    supernet.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    split = ParallelSplit(src, tgt, [], [])
    _WORKER["supernet"] = supernet.eval()
    _WORKER["batches"] = {n: scoring_batches(split.subset(n)) for n in sizes}


def _ready() -> None:
    return None


def _worker_loss(n: int, arch: dict) -> float:
    return valid_loss(_WORKER["supernet"], Architecture.from_dict(arch), _WORKER["batches"][n])
