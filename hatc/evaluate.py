"""Scoring detokenized output against raw references with sacreBLEU, and comparing two
systems on the same sentences with a paired bootstrap."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from hatc.errors import HatcError


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF with sacreBLEU's defaults (13a tokenization), and
    BLEU's signature so the number can be compared with others'."""
    if len(hypotheses) != len(references):
        raise HatcError(f"{len(hypotheses)} translations but {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
    chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "sentences": len(hypotheses),
    }


def _sentence_stats(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per sentence: 4 matched n-gram counts, 4 n-gram totals, hypothesis and reference length."""
    bleu = BLEU(effective_order=True)  # counts do not depend on it; it only silences sacreBLEU's advice
    rows = []
    for hyp, ref in zip(hypotheses, references):
        s = bleu.sentence_score(hyp, [ref])
        rows.append([*s.counts, *s.totals, s.sys_len, s.ref_len])
    return np.array(rows, dtype=np.int64)


def _bleu_of(stats: np.ndarray) -> float:
    """Corpus BLEU (sacreBLEU's defaults: exp smoothing) from summed sentence statistics."""
    counts, totals = stats[:4].tolist(), stats[4:8].tolist()
    return BLEU.compute_bleu(counts, totals, int(stats[8]), int(stats[9]), smooth_method="exp").score


def paired_bootstrap(
    baseline: Sequence[str],
    system: Sequence[str],
    references: Sequence[str],
    samples: int = 1000,
    seed: int = 12345,
) -> dict:
    """BLEU(system) - BLEU(baseline) with a 95% paired bootstrap confidence interval.

    Both systems are scored on the same resampled sets of sentences (Koehn 2004, the
    test behind ``sacrebleu --paired-bs``), from sacreBLEU's own per-sentence n-gram
    statistics, so the full-set numbers equal ``score``'s. ``p_value``: the share of
    resamples where the difference has the other sign (or is zero), a one-sided test.
    """
    if not len(baseline) == len(system) == len(references):
        raise HatcError(
            f"paired bootstrap needs equal lengths: {len(baseline)} and {len(system)} translations, "
            f"{len(references)} references"
        )
    if samples < 1:
        raise HatcError(f"samples must be at least 1, got {samples}")
    base_stats, sys_stats = _sentence_stats(baseline, references), _sentence_stats(system, references)
    delta = _bleu_of(sys_stats.sum(0)) - _bleu_of(base_stats.sum(0))
    rng = np.random.default_rng(seed)
    n = len(references)
    deltas = np.empty(samples)
    for i in range(samples):
        pick = rng.integers(0, n, n)
        deltas[i] = _bleu_of(sys_stats[pick].sum(0)) - _bleu_of(base_stats[pick].sum(0))
    other_side = np.mean(deltas <= 0) if delta > 0 else np.mean(deltas >= 0)
    low, high = np.percentile(deltas, [2.5, 97.5])
    return {
        "bleu_baseline": _bleu_of(base_stats.sum(0)),
        "bleu_system": _bleu_of(sys_stats.sum(0)),
        "delta": delta,
        "ci95": [float(low), float(high)],
        "p_value": float(other_side),
        "samples": samples,
        "seed": seed,
        "sentences": n,
    }
