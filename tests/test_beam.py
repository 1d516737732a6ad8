"""Beam search follows fairseq's rule, in both implementations.

``hatc.decode.beam_search`` (PyTorch, checkpoints) and
``hatc.runtime.beam.beam_search`` (numpy, artifacts) run here on scripted
decoders: log-probs that depend only on the source and the prefix, drawn from
a generator seeded by both. Each implementation is checked

- against an exhaustive search: with a beam wide enough to hold every
  hypothesis, beam search returns the best one under the length penalty;
- against ``fairseq_generate`` below, a line-by-line transcription of
  fairseq's ``SequenceGenerator._generate`` and ``search.BeamSearch.step``
  (the code behind HAT's BLEU numbers) into numpy, on many random decoders;
- against the other implementation.
"""

from __future__ import annotations

import functools
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hatc.data.subword import BOS, EOS, PAD, UNK
from hatc.decode import beam_search, greedy, pad_batch
from hatc.decoding import DecodeOptions
from hatc.runtime import beam as numpy_search

NEG_INF = -math.inf


# ---------------------------------------------------------------- scripted decoders


class Script:
    """Log-probs over ``vocab`` tokens for every (source, prefix); PAD and BOS are never generated.

    ``table`` fixes the probabilities of some prefixes (a dict or a function:
    prefix -> {token: probability} or None; the rest of the mass is spread
    evenly); other prefixes draw logits from a generator seeded by (seed,
    source, prefix), EOS raised by ``eos_bias``.
    """

    def __init__(self, vocab: int, seed: int = 0, eos_bias: float = 0.0, spread: float = 2.0, table=None):
        self.vocab, self.seed, self.eos_bias, self.spread = vocab, seed, eos_bias, spread
        self.table = table.get if isinstance(table, dict) else table or (lambda prefix: None)

    def logits(self, src: tuple[int, ...], prefix: tuple[int, ...]) -> np.ndarray:
        """``prefix`` starts with BOS: the decoder's input so far."""
        fixed = self.table(prefix[1:])
        if fixed is not None:
            allowed = [t for t in range(self.vocab) if t not in (PAD, BOS)]
            rest = (1.0 - sum(fixed.values())) / max(1, len(allowed) - len(fixed))
            probs = np.array([fixed.get(t, rest) if t in allowed else 0.0 for t in range(self.vocab)])
            with np.errstate(divide="ignore"):
                return np.log(probs).astype(np.float32)
        rng = np.random.default_rng([self.seed, len(src), *src, len(prefix), *prefix])
        x = rng.normal(0.0, self.spread, self.vocab).astype(np.float32)
        x[EOS] += self.eos_bias
        x[PAD] = x[BOS] = NEG_INF
        return x

    @functools.cache  # noqa: B019 (a script lives as long as its test)
    def lprobs(self, src: tuple[int, ...], prefix: tuple[int, ...]) -> np.ndarray:
        """What the searches see: PyTorch's float32 log-softmax of the logits (hatc.decode applies it)."""
        out = torch.log_softmax(torch.from_numpy(self.logits(src, prefix))[None], dim=-1)[0].numpy()
        out.flags.writeable = False
        return out


class _Rows(list):
    """Per-row state of the scripted model: ``index_select`` as the real caches do."""

    def index_select(self, order: torch.Tensor) -> _Rows:
        return _Rows(self[i] for i in order.tolist())


class ScriptedModel:
    """Stands in for a SubTransformer in hatc.decode: the 'encoder output' is
    the source, the 'cache' the prefix of every row."""

    def __init__(self, script: Script, max_positions: int = 1024):
        self.script = script
        self.cfg = SimpleNamespace(max_positions=max_positions)

    def encode(self, src: torch.Tensor) -> _Rows:
        return _Rows(tuple(t for t in row if t != PAD) for row in src.tolist())

    def start_decoding(self, enc: _Rows) -> _Rows:
        return _Rows((src, ()) for src in enc)

    def decode_step(self, tokens: torch.Tensor, cache: _Rows) -> tuple[torch.Tensor, _Rows]:
        cache = _Rows((src, prefix + (token,)) for (src, prefix), token in zip(cache, tokens[:, 0].tolist()))
        assert all(len(prefix) <= self.cfg.max_positions for _, prefix in cache)
        return torch.from_numpy(np.stack([self.script.logits(src, prefix) for src, prefix in cache])), cache


class ScriptedDecoding:
    """Stands in for ``hatc.runtime.runners.Decoding`` in hatc.runtime.beam."""

    def __init__(self, script: Script, rows: int, capacity: int = 64):
        self.script = script
        self.sig = SimpleNamespace(batch=rows, capacity=capacity)

    def start(self, src_tokens: np.ndarray) -> None:
        self.src = tuple(int(t) for t in src_tokens[0])
        self.prefixes: list[tuple[int, ...]] = [()] * self.sig.batch

    def advance(self, tokens: np.ndarray) -> np.ndarray:
        self.prefixes = [prefix + (int(t),) for prefix, t in zip(self.prefixes, tokens)]
        if len(self.prefixes[0]) > self.sig.capacity:
            raise ValueError(f"decoding past the cache capacity ({self.sig.capacity} tokens)")
        return np.stack([self.script.lprobs(self.src, prefix) for prefix in self.prefixes])

    def reorder(self, order: np.ndarray) -> None:
        self.prefixes = [self.prefixes[i] for i in order.tolist()]


def run_torch(script: Script, sources: list[list[int]], options: DecodeOptions) -> list[list[int]]:
    model = ScriptedModel(script)
    search_fn = greedy if options.beam == 1 else beam_search
    return search_fn(model, pad_batch(sources), options)


def run_numpy(script: Script, sources: list[list[int]], options: DecodeOptions) -> list[list[int]]:
    rules = options  # one DecodeOptions for both searches
    return [numpy_search.decode(ScriptedDecoding(script, rows=options.beam), src, rules) for src in sources]


IMPLEMENTATIONS = {"torch": run_torch, "numpy": run_numpy}


# ---------------------------------------------------------------- fairseq, transcribed


def fairseq_beam_search_step(step: int, lprobs: np.ndarray, scores: np.ndarray):
    """fairseq/search.py, BeamSearch.step. torch.topk's order among equal
    values is unspecified; here ties go to the lower index."""
    bsz, beam_size, vocab_size = lprobs.shape

    if step == 0:  # noqa: SIM108 (fairseq's layout)
        # at the first step all hypotheses are equally likely, so use
        # only the first beam
        lprobs = lprobs[:, ::beam_size, :].copy()
    else:
        # make probs contain cumulative scores for each hypothesis
        lprobs = lprobs + scores[:, :, step - 1][:, :, None]

    flat = lprobs.reshape(bsz, -1)
    k = min(
        # Take the best 2 x beam_size predictions. We'll choose the first
        # beam_size of these which don't predict eos to continue with.
        beam_size * 2,
        flat.shape[1] - 1,  # -1 so we never select pad
    )
    indices_buf = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    scores_buf = np.take_along_axis(flat, indices_buf, axis=1)
    # Project back into relative indices and beams
    beams_buf = indices_buf // vocab_size
    indices_buf = indices_buf % vocab_size
    return scores_buf, indices_buf, beams_buf


def fairseq_generate(
    step_fn,
    src_tokens: np.ndarray,
    vocab_size: int,
    beam_size: int,
    max_len_a: float = 0.0,
    max_len_b: int = 200,
    max_decoder_positions: int = 1024,
    len_penalty: float = 1.0,
    min_len: int = 0,
    unk_penalty: float = 0.0,
):
    """fairseq/sequence_generator.py, SequenceGenerator._generate (beam search,
    no prefix tokens, no n-gram blocking, normalize_scores=True), in numpy.

    ``step_fn(sentences, tokens)`` is the model: the log-probs (rows, V) for
    the decoder inputs ``tokens`` (rows, step + 1) of the given (original)
    sentences, one per row. hatc's decoders start from BOS where fairseq's
    start from EOS, and hatc does not apply fairseq's default ``min_len=1``
    (EOS is allowed as the first token), hence ``min_len=0`` here.
    """
    pad, unk, eos = PAD, UNK, EOS
    beam_size = min(beam_size, vocab_size - 1)
    bsz, src_len = src_tokens.shape
    max_len = min(int(max_len_a * src_len + max_len_b), max_decoder_positions - 1)

    # initialize buffers
    scores = np.zeros((bsz * beam_size, max_len + 1), dtype=np.float32)
    tokens = np.full((bsz * beam_size, max_len + 2), pad, dtype=np.int64)
    tokens[:, 0] = BOS
    # A list that indicates candidates that should be ignored.
    cands_to_ignore = np.zeros((bsz, beam_size), dtype=bool)
    # list of completed sentences
    finalized: list[list[dict]] = [[] for _ in range(bsz)]
    finished = [False for _ in range(bsz)]
    num_remaining_sent = bsz
    # number of candidate hypos per step
    cand_size = 2 * beam_size  # 2 x beam size in case half are EOS
    # offset arrays for converting between different indexing schemes
    bbsz_offsets = (np.arange(0, bsz) * beam_size)[:, None]
    cand_offsets = np.arange(0, cand_size)
    original_batch_idxs = np.arange(0, bsz)

    def is_finished(step, unfin_idx, max_len, finalized_sent_len, beam_size):
        assert finalized_sent_len <= beam_size
        return finalized_sent_len == beam_size or step == max_len

    def finalize_hypos(step, bbsz_idx, eos_scores, max_len):
        assert bbsz_idx.size == eos_scores.size
        # clone relevant token and attention tensors
        tokens_clone = tokens[bbsz_idx][:, 1 : step + 2].copy()  # skip the first index, which is BOS
        assert not (tokens_clone == eos).any()
        tokens_clone[:, step] = eos
        # compute scores per token position
        pos_scores = scores[bbsz_idx][:, : step + 1].copy()
        pos_scores[:, step] = eos_scores
        # convert from cumulative to per-position scores
        pos_scores[:, 1:] = pos_scores[:, 1:] - pos_scores[:, :-1]
        # normalize sentence-level scores
        eos_scores = eos_scores / np.float32((step + 1) ** len_penalty)

        # cum_unfin records which sentences in the batch are finished.
        cum_unfin = []
        prev = 0
        for f in finished:
            if f:
                prev += 1
            else:
                cum_unfin.append(prev)

        sents_seen: dict[str, None] = {}
        for i in range(bbsz_idx.shape[0]):
            idx = int(bbsz_idx[i])
            score = eos_scores[i]
            # sentence index in the current (possibly reduced) batch
            unfin_idx = idx // beam_size
            # sentence index in the original (unreduced) batch
            sent = unfin_idx + cum_unfin[unfin_idx]
            seen = str(sent) + "_" + str(unfin_idx)
            if seen not in sents_seen:
                sents_seen[seen] = None
            if len(finalized[sent]) < beam_size:
                finalized[sent].append({"tokens": tokens_clone[i], "score": score, "positional_scores": pos_scores[i]})

        newly_finished = []
        for unique_s in sents_seen:
            unique_sent, unique_unfin_idx = (int(x) for x in unique_s.split("_"))
            if not finished[unique_sent] and is_finished(
                step, unique_unfin_idx, max_len, len(finalized[unique_sent]), beam_size
            ):
                finished[unique_sent] = True
                newly_finished.append(unique_unfin_idx)
        return newly_finished

    reorder_state = None
    batch_idxs = None
    for step in range(max_len + 1):  # one extra step for EOS marker
        # reorder decoder internal states based on the prev choice of beams
        if reorder_state is not None:  # noqa: SIM102 (fairseq's layout)
            if batch_idxs is not None:
                # update beam indices to take into account removed sentences
                corr = batch_idxs - np.arange(batch_idxs.size)
                reorder_state = (reorder_state.reshape(-1, beam_size) + corr[:, None] * beam_size).reshape(-1)
                original_batch_idxs = original_batch_idxs[batch_idxs]
            # (the scripted model keeps no incremental state: it reads the whole prefix)

        lprobs = np.array(step_fn(np.repeat(original_batch_idxs, beam_size), tokens[:, : step + 1]), np.float32)
        lprobs[lprobs != lprobs] = NEG_INF

        lprobs[:, pad] = NEG_INF  # never select pad
        lprobs[:, unk] -= unk_penalty  # apply unk penalty

        # handle max length constraint
        if step >= max_len:
            lprobs[:, :eos] = NEG_INF
            lprobs[:, eos + 1 :] = NEG_INF
        elif step < min_len:
            # minimum length constraint (does not apply if using prefix_tokens)
            lprobs[:, eos] = NEG_INF

        cand_scores, cand_indices, cand_beams = fairseq_beam_search_step(
            step, lprobs.reshape(bsz, -1, vocab_size), scores.reshape(bsz, beam_size, -1)[:, :, :step]
        )

        # cand_bbsz_idx contains beam indices for the top candidate
        # hypotheses, with a range of values: [0, bsz*beam_size),
        # and dimensions: [bsz, cand_size]
        cand_bbsz_idx = cand_beams + bbsz_offsets

        # finalize hypotheses that end in eos
        # Shape of eos_mask: (batch size, beam size)
        eos_mask = (cand_indices == eos) & (cand_scores != NEG_INF)
        eos_mask[:, :beam_size][cands_to_ignore] = False

        # only consider eos when it's among the top beam_size indices
        # Now we know what beam item(s) to finish
        # Shape: 1d list of absolute-numbered
        eos_bbsz_idx = cand_bbsz_idx[:, :beam_size][eos_mask[:, :beam_size]]

        finalized_sents: list[int] = []
        if eos_bbsz_idx.size > 0:
            eos_scores = cand_scores[:, :beam_size][eos_mask[:, :beam_size]]
            finalized_sents = finalize_hypos(step, eos_bbsz_idx, eos_scores, max_len)
            num_remaining_sent -= len(finalized_sents)

        assert num_remaining_sent >= 0
        if num_remaining_sent == 0:
            break
        assert step < max_len, f"{step} < {max_len}"

        # Remove finalized sentences (ones for which {beam_size}
        # finished hypotheses have been generated) from the batch.
        if len(finalized_sents) > 0:
            new_bsz = bsz - len(finalized_sents)

            # construct batch_idxs which holds indices of batches to keep for the next pass
            batch_mask = np.ones(bsz, dtype=bool)
            batch_mask[finalized_sents] = False
            batch_idxs = np.nonzero(batch_mask)[0]

            eos_mask = eos_mask[batch_idxs]
            cand_beams = cand_beams[batch_idxs]
            bbsz_offsets = bbsz_offsets[:new_bsz]  # resize_(new_bsz, 1)
            cand_bbsz_idx = cand_beams + bbsz_offsets
            cand_scores = cand_scores[batch_idxs]
            cand_indices = cand_indices[batch_idxs]
            cands_to_ignore = cands_to_ignore[batch_idxs]

            scores = scores.reshape(bsz, -1)[batch_idxs].reshape(new_bsz * beam_size, -1)
            tokens = tokens.reshape(bsz, -1)[batch_idxs].reshape(new_bsz * beam_size, -1)
            bsz = new_bsz
        else:
            batch_idxs = None

        # Set active_mask so that values > cand_size indicate eos hypos
        # and values < cand_size indicate candidate active hypos.
        # After, the min values per row are the top candidate active hypos
        eos_mask[:, :beam_size] = ~((~cands_to_ignore) & (~eos_mask[:, :beam_size]))
        active_mask = np.add(
            (eos_mask.astype(np.int64) * cand_size)[:, : eos_mask.shape[1]],
            cand_offsets[: eos_mask.shape[1]],
        )

        # get the top beam_size active hypotheses, which are just
        # the hypos with the smallest values in active_mask.
        active_hypos = np.argsort(active_mask, axis=1, kind="stable")[:, :beam_size]
        new_cands_to_ignore = np.take_along_axis(active_mask, active_hypos, axis=1)

        # update cands_to_ignore to ignore any finalized hypos.
        cands_to_ignore = (new_cands_to_ignore >= cand_size)[:, :beam_size]
        # Make sure there is at least one active item for each sentence in the batch.
        assert (~cands_to_ignore).any(axis=1).all()

        # {active_bbsz_idx} denotes which beam number is continued for each new hypothesis (a beam
        # can be selected more than once).
        active_bbsz_idx = np.take_along_axis(cand_bbsz_idx, active_hypos, axis=1).reshape(-1)

        # copy tokens and scores for active hypotheses
        tokens[:, : step + 1] = tokens[active_bbsz_idx, : step + 1]
        tokens.reshape(bsz, beam_size, -1)[:, :, step + 1] = np.take_along_axis(cand_indices, active_hypos, axis=1)
        if step > 0:
            scores[:, :step] = scores[active_bbsz_idx, :step]
        scores.reshape(bsz, beam_size, -1)[:, :, step] = np.take_along_axis(cand_scores, active_hypos, axis=1)

        # reorder incremental state in decoder
        reorder_state = active_bbsz_idx

    # sort by score descending
    for sent in range(len(finalized)):
        finalized[sent] = sorted(finalized[sent], key=lambda r: r["score"], reverse=True)
    return finalized


def fairseq_best(script: Script, sources: list[list[int]], options: DecodeOptions) -> list[list[int]]:
    """fairseq's best hypothesis per sentence, without the EOS ([] when none finished)."""
    keys = [tuple(s) for s in sources]

    def step_fn(sentences, tokens):
        return np.stack([script.lprobs(keys[s], tuple(int(t) for t in row)) for s, row in zip(sentences, tokens)])

    width = max(len(s) for s in sources)  # fairseq's max_len reads the padded batch's width
    src_tokens = np.full((len(sources), width), PAD, dtype=np.int64)
    finalized = fairseq_generate(
        step_fn, src_tokens, script.vocab, options.beam, options.max_len_a, options.max_len_b,
        max_decoder_positions=options.max_len + 1, len_penalty=options.lenpen,
    )  # fmt: skip
    return [[int(t) for t in hypos[0]["tokens"][:-1]] if hypos else [] for hypos in finalized]


# ---------------------------------------------------------------- an exhaustive oracle


def oracle(script: Script, src: list[int], options: DecodeOptions) -> list[int]:
    """The best of all hypotheses of at most ``limit`` tokens then EOS, by
    ``sum(log p) / (tokens + 1) ** lenpen``."""
    key = tuple(src)
    words = [t for t in range(script.vocab) if t not in (PAD, BOS, EOS)]
    best, best_score = None, NEG_INF
    for length in range(options.limit(len(src)) + 1):
        for hyp in itertools.product(words, repeat=length):
            prefix = (BOS, *hyp)
            total = sum(float(script.lprobs(key, prefix[: i + 1])[t]) for i, t in enumerate(hyp))
            total += float(script.lprobs(key, prefix)[EOS])
            score = total / (length + 1) ** options.lenpen
            if score > best_score:
                best, best_score = list(hyp), score
    return best


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_eos_below_the_top_beam_candidates_does_not_finish(impl):
    """At beam 2, step 1 ranks [4 6] > [4 EOS] > [5 EOS] > [5 7]: fairseq finishes
    [4] (rank 1) but not [5] (rank 2, below the top 2), keeps [4 6] and [5 7],
    and [4 6 EOS] then beats [4]. Finishing [5] too would stop at [4]."""
    table = {
        (): {4: 0.6, 5: 0.3, EOS: 0.01},
        (4,): {6: 0.5, EOS: 0.45},
        (5,): {EOS: 0.5, 7: 0.3},
        (4, 6): {EOS: 0.9},
    }
    script = Script(vocab=8, table=table)
    options = DecodeOptions(beam=2, lenpen=0.6, max_len_a=0, max_len_b=5)
    src = [[4, 5, EOS]]
    assert fairseq_best(script, src, options) == [[4, 6]]
    assert IMPLEMENTATIONS[impl](script, src, options) == [[4, 6]]


def _random_case(seed: int, batch: int):
    rng = np.random.default_rng(seed)
    beam = int(rng.integers(1, 6))
    # 4 special tokens and at least one word; fairseq's cands_to_ignore never fires from beam + 2 tokens
    vocab = int(rng.integers(max(5, beam + 2), beam + 9))
    script = Script(vocab, seed=seed, eos_bias=float(rng.uniform(-1.0, 3.0)), spread=float(rng.uniform(0.5, 3.0)))
    options = DecodeOptions(
        beam=beam,
        lenpen=float(rng.choice([0.0, 0.6, 1.0, 2.0])),
        max_len_a=0 if batch > 1 else float(rng.choice([0.0, 0.5, 1.2])),  # fairseq's limit reads the padded width
        max_len_b=int(rng.integers(1, 8)),
    )
    sources = [list(rng.integers(4, 50, int(rng.integers(1, 6)))) + [EOS] for _ in range(batch)]
    return script, sources, options


def _greedy(script: Script, src: list[int], options: DecodeOptions) -> list[int]:
    key, prefix = tuple(src), (BOS,)
    for _ in range(options.limit(len(src))):
        token = int(np.argmax(script.lprobs(key, prefix)))
        if token == EOS:
            break
        prefix += (token,)
    return list(prefix[1:])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_beam_search_equals_fairseqs_on_random_decoders(impl):
    not_greedy = 0
    for seed in range(300):
        script, sources, options = _random_case(seed, batch=1 + seed % 4 if impl == "torch" else 1)
        expected = fairseq_best(script, sources, options)
        assert IMPLEMENTATIONS[impl](script, sources, options) == expected, f"seed {seed}: {options}"
        not_greedy += options.beam > 1 and expected != [_greedy(script, s, options) for s in sources]
    assert not_greedy > 50  # the beam matters in many of the cases


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("lenpen", [0.0, 0.6, 1.0, 2.0])
def test_a_beam_wide_enough_finds_the_exhaustive_best(impl, lenpen):
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        words, limit = int(rng.integers(2, 4)), int(rng.integers(1, 4))
        script = Script(words + 3, seed=seed, eos_bias=float(rng.uniform(-1.0, 2.0)))
        beam = (words + 1) * words**limit  # every hypothesis stays in the beam
        options = DecodeOptions(beam=beam, lenpen=lenpen, max_len_a=0, max_len_b=limit)
        src = [4 + seed, EOS]
        assert IMPLEMENTATIONS[impl](script, [src], options) == [oracle(script, src, options)], f"seed {seed}"


def test_both_implementations_agree_on_random_decoders():
    for seed in range(1000, 1150):
        script, sources, options = _random_case(seed, batch=3)
        assert run_torch(script, sources, options) == run_numpy(script, sources, options), f"seed {seed}"


# Every prefix: mostly 4, EOS least likely (no ties, so no tie-breaking in play).
LONG_WINDED = {4: 0.97, 5: 0.01, 6: 0.009, 7: 0.008, UNK: 0.002, EOS: 0.001}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_max_length_forces_eos_after_limit_tokens(impl):
    """fairseq's max_len: up to max_len tokens, then EOS (forced at step max_len)."""
    script = Script(8, table=lambda prefix: LONG_WINDED)
    for beam, limit in itertools.product((1, 3), (1, 3, 5)):
        options = DecodeOptions(beam=beam, max_len_a=0, max_len_b=limit)
        assert IMPLEMENTATIONS[impl](script, [[7, EOS]], options) == [[4] * limit]
    # max_len_a * (source tokens, EOS included) + max_len_b, rounded down, capped by max_len
    options = DecodeOptions(beam=3, max_len_a=0.5, max_len_b=1, max_len=256)
    assert IMPLEMENTATIONS[impl](script, [[7, 8, 9, 10, 11, EOS]], options) == [[4] * 4]
    options = DecodeOptions(beam=3, max_len_a=0.5, max_len_b=1, max_len=2)
    assert IMPLEMENTATIONS[impl](script, [[7, 8, 9, 10, 11, EOS]], options) == [[4] * 2]


def test_beam_search_stays_within_the_model_positions():
    """fairseq caps max_len at the decoder's positions - 1 (BOS takes a position)."""
    script = Script(8, table=lambda prefix: LONG_WINDED)
    model = ScriptedModel(script, max_positions=6)  # asserts that no prefix passes its positions
    options = DecodeOptions(beam=2, max_len_a=0, max_len_b=50)
    assert beam_search(model, pad_batch([[7, EOS]]), options) == [[4] * 5]
    assert greedy(model, pad_batch([[7, EOS]]), options) == [[4] * 5]
    rules = DecodeOptions(2, 0.6, 0, 50, 256)
    assert numpy_search.beam_search(ScriptedDecoding(script, rows=2, capacity=6), [7, EOS], rules) == [4] * 5
    assert numpy_search.greedy(ScriptedDecoding(script, rows=2, capacity=6), [7, EOS], rules) == [4] * 5


class ModelDecoding:
    """``hatc.runtime.runners.Decoding`` over a SubTransformer's own incremental
    decoding, so that the numpy search runs on the log-probs PyTorch's sees."""

    def __init__(self, model, rows: int):
        self.model = model
        self.sig = SimpleNamespace(batch=rows, capacity=model.cfg.max_positions)

    def start(self, src_tokens: np.ndarray) -> None:
        enc = self.model.encode(torch.from_numpy(src_tokens))
        self.cache = self.model.start_decoding(enc.index_select(torch.zeros(self.sig.batch, dtype=torch.long)))

    @torch.no_grad()
    def advance(self, tokens: np.ndarray) -> np.ndarray:
        logits, self.cache = self.model.decode_step(torch.from_numpy(tokens).view(-1, 1), self.cache)
        return torch.log_softmax(logits.float(), dim=-1).numpy()

    def reorder(self, order: np.ndarray) -> None:
        self.cache = self.cache.index_select(torch.from_numpy(order))


def test_both_implementations_agree_on_a_model():
    from hatc.space import load_space
    from hatc.static.model import ModelConfig, SubTransformer

    space = load_space("tiny")
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=40, qkv_dim=space.qkv_dim, super_embed_dim=space.super_embed_dim)
    model = SubTransformer(space.sample(np.random.default_rng(5)), cfg).eval()
    with torch.no_grad():  # sharpen the output so that hypotheses differ
        model.embed_tokens.weight.mul_(6)
    rng = np.random.default_rng(5)
    results = set()
    for i in range(12):
        src = rng.integers(4, 40, int(rng.integers(2, 10))).tolist() + [EOS]
        beam, lenpen = 2 + i % 4, (0.6, 1.0, 0.0)[i % 3]
        options = DecodeOptions(beam=beam, lenpen=lenpen)
        expected = beam_search(model, pad_batch([src]), options)[0]
        rules = DecodeOptions(beam, lenpen)
        assert numpy_search.beam_search(ModelDecoding(model, rows=beam), src, rules) == expected, i
        results.add(tuple(expected))
    assert len(results) > 6
