"""Decoding with the incremental key/value cache: greedy and batched beam search.

Beam search follows fairseq's ``SequenceGenerator`` (beam search, no
``min_len``), whose BLEU numbers HAT reports:

- a sentence may produce at most ``limit`` tokens (``DecodeOptions.limit``,
  fairseq's ``max_len``, at most the model's positions - 1): at step
  ``limit`` only EOS is allowed;
- every step ranks the top ``2 * beam`` candidates (extensions of the live
  hypotheses) by summed log-probability; an EOS among the first ``beam`` of
  them finishes its hypothesis with score ``sum(log p) / len ** lenpen`` (len
  counts the EOS); an EOS ranked lower is dropped; the ``beam`` best non-EOS
  candidates live on;
- a sentence is done once it has ``beam`` finished hypotheses (or at step
  ``limit``), and the best finished one is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from hatc.data.subword import BOS, EOS, PAD, SubwordModel
from hatc.decoding import DecodeOptions
from hatc.errors import HatcError
from hatc.static.model import SubTransformer


def _limits(model: SubTransformer, src: torch.Tensor, options: DecodeOptions) -> torch.Tensor:
    """Per-sentence length limits from the real (unpadded) source lengths, so
    a sentence decodes the same whatever it is batched with; the EOS after
    ``limit`` tokens needs ``limit + 1`` decoder positions (BOS takes one)."""
    cap = model.cfg.max_positions - 1
    return torch.tensor([min(options.limit(int(n)), cap) for n in src.ne(PAD).sum(dim=1)])


def _step_logprobs(model: SubTransformer, tokens: torch.Tensor, cache, step: int, limits: torch.Tensor):
    logits, cache = model.decode_step(tokens, cache)
    lprobs = F.log_softmax(logits.float(), dim=-1)
    lprobs[:, PAD] = lprobs[:, BOS] = float("-inf")  # never generated
    full = step >= limits  # out of room: only EOS may follow
    if full.any():
        eos = lprobs[full, EOS]
        lprobs[full] = float("-inf")
        lprobs[full, EOS] = eos
    return lprobs, cache


@torch.no_grad()
def greedy(model: SubTransformer, src: torch.Tensor, options: DecodeOptions) -> list[list[int]]:
    """Arg-max decoding of a padded batch (B, S) -> token ids without EOS."""
    batch = src.shape[0]
    limits = _limits(model, src, options)
    cache = model.start_decoding(model.encode(src))
    tokens = torch.full((batch, 1), BOS, dtype=torch.long)
    out = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    for step in range(int(limits.max()) + 1):
        lprobs, cache = _step_logprobs(model, tokens, cache, step, limits)
        tokens = lprobs.argmax(-1, keepdim=True)
        for i in torch.nonzero(~done).flatten().tolist():
            if tokens[i, 0].item() == EOS:
                done[i] = True
            else:
                out[i].append(tokens[i, 0].item())
        if done.all():
            break
    return out


def _normalized(score: float, length: int, lenpen: float) -> float:
    """A finished hypothesis's score: ``score / length ** lenpen``, in float32 as
    fairseq divides; ``length`` counts the EOS."""
    return float(np.float32(score) / np.float32(length**lenpen))


@torch.no_grad()
def beam_search(model: SubTransformer, src: torch.Tensor, options: DecodeOptions) -> list[list[int]]:
    """Batched beam search of a padded batch (B, S) -> best token ids without EOS."""
    batch, k = src.shape[0], options.beam
    limits = _limits(model, src, options)
    enc = model.encode(src)
    cache = model.start_decoding(enc.index_select(torch.arange(batch).repeat_interleave(k)))
    tokens = torch.full((batch * k, 1), BOS, dtype=torch.long)
    history = torch.zeros(batch * k, 0, dtype=torch.long)
    scores = torch.zeros(batch, k)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(int(limits.max()) + 1):
        lprobs, cache = _step_logprobs(model, tokens, cache, step, limits.repeat_interleave(k))
        vocab = lprobs.shape[-1]
        candidates = (scores.unsqueeze(-1) + lprobs.view(batch, k, vocab)).view(batch, k * vocab)
        top_scores, top_ids = candidates.topk(2 * k, dim=-1)  # at most k are EOS: k non-EOS remain
        new_scores = torch.full((batch, k), float("-inf"))
        origin = torch.arange(batch * k).view(batch, k)
        new_tokens = torch.full((batch, k), PAD, dtype=torch.long)
        for b in range(batch):
            if done[b]:  # keep feeding harmless (-inf) beams
                continue
            kept = 0
            for rank, (score, flat) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist())):
                if score == float("-inf") or kept == k:  # the rest can neither finish nor live on
                    break
                beam, token = divmod(flat, vocab)
                if token == EOS:  # finishes only among the top k candidates; dropped below them
                    if rank < k and len(finished[b]) < k:
                        hyp = history[b * k + beam].tolist()
                        finished[b].append((_normalized(score, step + 1, options.lenpen), hyp))
                    continue
                new_scores[b, kept], origin[b, kept], new_tokens[b, kept] = score, b * k + beam, token
                kept += 1
            done[b] = len(finished[b]) >= k or step >= int(limits[b])
        if all(done):
            break
        order = origin.view(-1)
        cache = cache.index_select(order)
        history = torch.cat([history.index_select(0, order), new_tokens.view(-1, 1)], dim=1)
        tokens, scores = new_tokens.view(-1, 1), new_scores
    return [max(f, key=lambda pair: pair[0])[1] if f else [] for f in finished]


def pad_batch(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), PAD, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def translate_lines(
    model: SubTransformer,
    subword: SubwordModel,
    lines: Sequence[str],
    options: DecodeOptions,
    batch_sentences: int = 32,
    on_batch: Callable[[int], None] = lambda _: None,
) -> list[str]:
    """Detokenized translations of ``lines``, in order (batched by length)."""
    encoded = [subword.encode(line) + [EOS] for line in lines]
    return [subword.decode(ids) for ids in translate_ids(model, encoded, options, batch_sentences, on_batch)]


def translate_ids(
    model: SubTransformer,
    encoded: Sequence[list[int]],
    options: DecodeOptions,
    batch_sentences: int = 32,
    on_batch: Callable[[int], None] = lambda _: None,
) -> list[list[int]]:
    """Target ids of sources (``subword ids + [EOS]``), in order (batched by length)."""
    max_positions = model.cfg.max_positions
    for number, ids in enumerate(encoded, start=1):
        if len(ids) > max_positions:
            raise HatcError(f"input line {number} has {len(ids)} subwords; the model takes at most {max_positions}")
    options = replace(options, max_len=min(options.max_len, max_positions - 1))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[list[int]] = [[] for _ in encoded]
    search = greedy if options.beam == 1 else beam_search
    model.eval()
    for start in range(0, len(order), batch_sentences):
        chunk = order[start : start + batch_sentences]
        hyps = search(model, pad_batch([encoded[i] for i in chunk]), options)
        for i, hyp in zip(chunk, hyps):
            results[i] = list(hyp)
        on_batch(len(chunk))
    return results
