"""What ``hatc compile`` checks before it writes anything.

Two checks per build, both against the PyTorch SubTransformer the artifact
comes from:

- parity: teacher-forced decoder steps on sample inputs (``check_parity``),
  reported as the max abs diff;
- greedy translations of a few real sentences through every length bucket
  that holds them: token for token equal to ``hatc.decode.greedy``.

A mismatch raises a HatcError that names the bucket and the diff, and the
artifact is not written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from hatc.compile.export import ExportedGraphs
from hatc.compile.parity import ParityError, RoundingFlips, check_parity
from hatc.data.subword import BOS, EOS
from hatc.decode import greedy
from hatc.decoding import DecodeOptions
from hatc.errors import HatcError
from hatc.runtime import beam as numpy_search
from hatc.runtime.runners import Decoding, GraphRunner, OrtRunner
from hatc.static.model import SubTransformer

# Everyday sentences in the style of Multi30k (the checkpoint holds no data set).
SENTENCES: tuple[str, ...] = (
    "A man is riding a bike down the street.",
    "Two dogs are playing in the snow.",
    "A woman in a red dress is singing on stage.",
    "Children play soccer in a park on a sunny day.",
    "A group of people stand outside a large building.",
)
PARITY_STEPS = 4


class VerificationError(HatcError):
    """A build does not compute what PyTorch computes; nothing is written."""


@dataclass
class CompileEvent:
    """Progress for the CLI: a stage started (``done`` of ``total`` finished), or a warning."""

    kind: str  # "stage" or "warning"
    message: str
    done: int = 0
    total: int = 0


class Stages:
    """Counts compile stages for a progress callback."""

    def __init__(self, on_event: Callable[[CompileEvent], None], total: int):
        self.on_event, self.total, self.done = on_event, total, 0

    def next(self, message: str) -> None:
        self.on_event(CompileEvent("stage", message, self.done, self.total))
        self.done += 1


def runner_parity(
    runner: GraphRunner,
    model: SubTransformer,
    bucket: int,
    what: str,
    reference: GraphRunner | None = None,
    flips: RoundingFlips | None = None,
) -> float:
    """Max abs diff of ``runner`` against PyTorch (or ``reference``); VerificationError above the
    tolerance (beyond what ``flips`` lets a build that quantizes activations stray)."""
    try:
        return check_parity(runner, model, steps=PARITY_STEPS, reference=reference, flips=flips).max_abs_diff
    except ParityError as e:
        raise VerificationError(f"bucket {bucket}: {what}: {e}; artifact not written") from None


def ort_parity(exported: ExportedGraphs, model: SubTransformer, bucket: int) -> float:
    runner = OrtRunner(exported.encoder, exported.decoder, exported.signature)
    return runner_parity(runner, model, bucket, "ONNX Runtime")


def check_greedy(
    loaded: Any,
    runners: Mapping[int, GraphRunner],
    sentences: Sequence[str],
    options: DecodeOptions,
    references: Mapping[int, GraphRunner] | None = None,
    flips: RoundingFlips | None = None,
) -> dict[str, Any]:
    """Greedy translations through every bucket's runner equal PyTorch's (or those of the
    same bucket's ``references`` runner), token for token.

    ``flips``: the build quantizes activations (``hatc.compile.w4a8``). A translation may then
    part from the reference's where the reference itself nearly ties: its log-probs of the two
    tokens within ``RoundingFlips.tie``, in at most ``RoundingFlips.share`` of the checks; such
    a sentence counts as a near tie (the rest of it is not compared: the two have parted).

    Returns a summary for the manifest (sentences, checks, all equal; near ties with ``flips``).
    """
    rules = replace(options, beam=1)
    checks, near_ties = 0, 0
    expected_from = "PyTorch's" if references is None else "the reference's"
    for number, line in enumerate(sentences, start=1):
        src = loaded.subword.encode(line) + [EOS]
        expected = greedy(loaded.model, torch.tensor([src]), options)[0] if references is None else None
        for bucket, runner in sorted(runners.items()):
            if len(src) > bucket:
                continue
            if references is not None:
                expected = numpy_search.greedy(Decoding(references[bucket]), src, rules)
            got = numpy_search.greedy(Decoding(runner), src, rules)
            checks += 1
            if got == expected:
                continue
            where = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            if flips is not None and references is not None:
                preferred, other = _token(expected, where), _token(got, where)
                gap = _reference_gap(references[bucket], src, expected[:where], preferred, other)
                if gap <= flips.tie:
                    near_ties += 1
                    continue
            raise VerificationError(
                f"bucket {bucket}: the greedy translation of sentence {number} ({line!r}) differs from "
                f"{expected_from} at token {where} ({len(got)} vs {len(expected)} tokens); artifact not written"
            )
    if flips is not None and near_ties > flips.share * checks:
        raise VerificationError(
            f"{near_ties} of {checks} greedy translations part from {expected_from} at a near tie: more than "
            f"{flips.share:.0%}, more than rounding explains; artifact not written"
        )
    summary = {"sentences": len(sentences), "checks": checks, "equal": near_ties == 0}
    return summary | ({"near_ties": near_ties} if flips is not None else {})


def _token(tokens: Sequence[int], at: int) -> int:
    return tokens[at] if at < len(tokens) else EOS  # a greedy translation ends with EOS, not listed


def _reference_gap(reference: GraphRunner, src: list[int], prefix: Sequence[int], preferred: int, other: int) -> float:
    """By how much the reference's log-prob of ``preferred`` exceeds that of ``other`` after ``prefix``."""
    decoding = Decoding(reference)
    decoding.start(np.asarray([src], dtype=np.int64))
    tokens = np.full(decoding.sig.batch, BOS, dtype=np.int64)
    for token in prefix:
        decoding.advance(tokens)
        tokens[:] = token
    log_probs = decoding.advance(tokens)[0]
    return float(log_probs[preferred] - log_probs[other])
