"""Greedy and beam search in numpy over the exported graphs (no torch).

The same rules as ``hatc.decode`` (fairseq's, which HAT's BLEU numbers come
from), one sentence at a time, so that an artifact translates exactly as its
checkpoint does:

- a sentence of n source tokens (EOS included) may produce at most
  ``limit = min(max_len, int(max_len_a * n + max_len_b))`` target tokens
  before its EOS (fairseq's ``max_len``; at most the graph's cache capacity -
  1): at step ``limit`` only EOS is allowed;
- PAD and BOS are never generated;
- every beam search step ranks the top 2 x beam candidates; an EOS among the
  first ``beam`` of them finishes its hypothesis with score
  ``sum(log p) / len ** lenpen`` (len counts the EOS), an EOS ranked lower is
  dropped, and the ``beam`` best non-EOS candidates live on; the sentence is
  done at ``beam`` finished hypotheses (or at step ``limit``) and the best
  finished one wins;
- scores accumulate in float32, as PyTorch's do, so ties break identically.

The decoder graph's batch B is the compiled beam; a smaller beam uses the
first rows and feeds PAD to the rest.
"""

from __future__ import annotations

import numpy as np

from hatc.data.subword import BOS, EOS, PAD
from hatc.decoding import DecodeOptions
from hatc.runtime.runners import Decoding

NEG_INF = np.float32(-np.inf)


def _limit(decoding: Decoding, src: list[int], options: DecodeOptions) -> int:
    """Tokens before the EOS; the EOS after ``limit`` tokens takes cache slot ``limit``."""
    return min(options.limit(len(src)), decoding.sig.capacity - 1)


def _mask(log_probs: np.ndarray, step: int, limit: int) -> np.ndarray:
    """A float32 copy with PAD/BOS forbidden, and only EOS allowed at the limit."""
    lp = np.array(log_probs, dtype=np.float32)
    lp[:, PAD] = lp[:, BOS] = NEG_INF
    if step >= limit:
        eos = lp[:, EOS].copy()
        lp[:] = NEG_INF
        lp[:, EOS] = eos
    return lp


def _top(candidates: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest values, best first, ties to the lower index."""
    n = min(n, candidates.size)
    part = np.argpartition(-candidates, n - 1)[:n] if n < candidates.size else np.arange(candidates.size)
    return part[np.lexsort((part, -candidates[part]))]


def greedy(decoding: Decoding, src: list[int], options: DecodeOptions) -> list[int]:
    """Arg-max decoding of one source (ids ending in EOS) -> target ids without EOS."""
    limit = _limit(decoding, src, options)
    decoding.start(np.asarray([src], dtype=np.int64))
    tokens = np.full(decoding.sig.batch, BOS, dtype=np.int64)
    out: list[int] = []
    for step in range(limit + 1):
        lp = _mask(decoding.advance(tokens)[:1], step, limit)
        token = int(np.argmax(lp[0]))
        if token == EOS:
            break
        out.append(token)
        tokens[:] = token
    return out


def _normalized(score: float, length: int, lenpen: float) -> float:
    """A finished hypothesis's score: ``score / length ** lenpen``, in float32 as
    fairseq divides; ``length`` counts the EOS."""
    return float(np.float32(score) / np.float32(length**lenpen))


def beam_search(decoding: Decoding, src: list[int], options: DecodeOptions) -> list[int]:
    """Beam search of one source (ids ending in EOS) -> the best target ids without EOS."""
    rows, k = decoding.sig.batch, options.beam
    if k > rows:
        raise ValueError(f"beam {k} exceeds the decoder graph's {rows} rows")
    limit = _limit(decoding, src, options)
    decoding.start(np.asarray([src], dtype=np.int64))
    tokens = np.full(rows, BOS, dtype=np.int64)
    history = np.zeros((k, 0), dtype=np.int64)
    scores = np.full(k, NEG_INF, dtype=np.float32)
    scores[0] = 0.0  # all beams start identical: expand only the first
    finished: list[tuple[float, list[int]]] = []
    for step in range(limit + 1):
        lp = _mask(decoding.advance(tokens)[:k], step, limit)
        vocab = lp.shape[1]
        candidates = (scores[:, None] + lp).reshape(-1)  # float32, as PyTorch adds them
        new_scores = np.full(k, NEG_INF, dtype=np.float32)
        origin = np.zeros(k, dtype=np.int64)
        new_tokens = np.full(k, PAD, dtype=np.int64)
        kept = 0
        for rank, flat in enumerate(_top(candidates, 2 * k).tolist()):  # at most k are EOS: k non-EOS remain
            score = float(candidates[flat])
            if score == float("-inf") or kept == k:  # the rest can neither finish nor live on
                break
            beam, token = divmod(flat, vocab)
            if token == EOS:  # finishes only among the top k candidates; dropped below them
                if rank < k and len(finished) < k:
                    finished.append((_normalized(score, step + 1, options.lenpen), history[beam].tolist()))
                continue
            new_scores[kept], origin[kept], new_tokens[kept] = score, beam, token
            kept += 1
        if len(finished) >= k or step >= limit:
            break
        order = np.zeros(rows, dtype=np.int64)
        order[:k] = origin
        decoding.reorder(order)
        history = np.concatenate([history[origin], new_tokens[:, None]], axis=1)
        tokens = np.full(rows, PAD, dtype=np.int64)
        tokens[:k] = new_tokens
        scores = new_scores
    return max(finished, key=lambda pair: pair[0])[1] if finished else []


def decode(decoding: Decoding, src: list[int], options: DecodeOptions) -> list[int]:
    """Greedy for beam 1 (as ``hatc translate`` does), beam search otherwise."""
    return greedy(decoding, src, options) if options.beam == 1 else beam_search(decoding, src, options)
