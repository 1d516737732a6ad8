"""The paired bootstrap behind every BLEU difference hatc reports (``hatc.evaluate.paired_bootstrap``),
on real Multi30k references."""

from __future__ import annotations

import pytest

from hatc.data.corpus import read_lines
from hatc.errors import HatcError
from hatc.evaluate import paired_bootstrap, score


@pytest.fixture(scope="module")
def references(shared_data) -> list[str]:
    return read_lines(shared_data / "multi30k" / "test_2016_flickr.de.gz")[:300]


def drop_words(lines: list[str], every: int) -> list[str]:
    """Every ``every``-th sentence loses its last two words: a slightly worse system."""
    return [" ".join(s.split()[:-2]) if i % every == 0 else s for i, s in enumerate(lines)]


def test_full_set_scores_equal_sacrebleus_corpus_scores(references):
    worse, worst = drop_words(references, 2), drop_words(references, 1)
    result = paired_bootstrap(worst, worse, references, samples=50)
    assert result["bleu_baseline"] == pytest.approx(score(worst, references)["bleu"], abs=1e-9)
    assert result["bleu_system"] == pytest.approx(score(worse, references)["bleu"], abs=1e-9)
    assert result["delta"] == pytest.approx(result["bleu_system"] - result["bleu_baseline"], abs=1e-12)


def test_a_clearly_better_system_has_an_interval_above_zero(references):
    result = paired_bootstrap(drop_words(references, 1), references, references, samples=200)
    assert result["delta"] > 0 and result["ci95"][0] > 0 and result["p_value"] < 0.05
    assert result["ci95"][0] <= result["delta"] <= result["ci95"][1]
    reverse = paired_bootstrap(references, drop_words(references, 1), references, samples=200)
    assert reverse["delta"] == pytest.approx(-result["delta"]) and reverse["ci95"][1] < 0


def test_identical_systems_differ_by_exactly_zero(references):
    same = drop_words(references, 3)
    result = paired_bootstrap(same, same, references, samples=100)
    assert result["delta"] == 0 and result["ci95"] == [0.0, 0.0]


def test_a_small_difference_is_not_called_significant(references):
    one_sentence = list(references)
    one_sentence[0] = "ganz anders"
    result = paired_bootstrap(references, one_sentence, references, samples=200)
    assert result["delta"] < 0
    assert result["ci95"][0] < 0 <= result["ci95"][1] and result["p_value"] > 0.05  # the interval holds zero


def test_seeded(references):
    a, b = drop_words(references, 1), drop_words(references, 2)
    first = paired_bootstrap(a, b, references, samples=100, seed=3)
    assert paired_bootstrap(a, b, references, samples=100, seed=3) == first
    assert paired_bootstrap(a, b, references, samples=100, seed=4)["ci95"] != first["ci95"]


def test_unequal_lengths_are_refused(references):
    with pytest.raises(HatcError, match="equal lengths"):
        paired_bootstrap(references[:-1], references, references)
