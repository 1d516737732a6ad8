"""Parity: a backend running the exported graphs against the PyTorch SubTransformer.

The reference is the static model's own ``encode`` / ``start_decoding`` /
``decode_step`` (growing cache), not the export wrappers, so a check covers
the wrappers, the exporter and the backend at once. Compared: the encoder's
cross-attention keys/values, the log-probs of every step, and the filled
slots of the final self-attention caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hatc.errors import HatcError
from hatc.runtime.runners import Decoding, GraphRunner, pad_source
from hatc.static.model import SubTransformer

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class RoundingFlips:
    """What a build whose kernels quantize activations (``hatc.compile.w4a8``) may show against
    its reference beyond ``tolerance``.

    Quantizing an activation is a step function: where the build's float value and the
    reference's (equal to about 1e-7, summed in other orders) fall on two sides of a rounding
    boundary, one int8 differs by one, and every value computed from it moves by that quantum
    times a weight. ``benchmarks/rounding_flips.py`` measures how far, on the 60-minute
    Multi30k supernet (``benchmarks/results/rounding_flips.json``); these bounds leave room
    above what it found.

    The encoder quantizes no activations: its outputs keep the plain tolerance. Of the
    log-prob rows (one beam row of one step) and, apart, of the cache rows (one beam row of a
    cache, every step), at most ``share`` may stray beyond the tolerance, none by more than
    ``max_diff``. A greedy translation may part from the reference's only where the
    reference's own log-probs of the two tokens are within ``tie``, in at most ``share`` of
    the checks.
    """

    max_diff: float = 0.25
    share: float = 0.75  # measured: up to 0.31 of a seed's log-prob rows; a bug that moves all is caught
    tie: float = 0.15  # two log-probs, each moved by at most the measured 0.069


class ParityError(HatcError):
    """A backend's outputs differ from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class ParityReport:
    backend: str
    max_abs_diff: float  # over every compared value
    worst: str  # which output it was
    steps: int
    tolerance: float
    strayed_rows: int = 0  # rows beyond the tolerance that ``RoundingFlips`` let pass

    def __str__(self) -> str:
        return f"{self.backend}: max abs diff {self.max_abs_diff:.2e} ({self.worst}) over {self.steps} steps"


@torch.no_grad()
def reference_trajectory(
    model: SubTransformer, src: np.ndarray, prev: np.ndarray
) -> tuple[dict[str, np.ndarray], list[np.ndarray], dict[str, np.ndarray]]:
    """PyTorch's cross K/V (at the source batch), per-step log-probs and final caches."""
    model = model.eval()
    enc = model.encode(torch.from_numpy(src))
    cross = model.start_decoding(enc)
    encoder = {}
    for i, (k, v) in enumerate(zip(cross.cross_k, cross.cross_v)):
        encoder[f"cross_k_{i}"], encoder[f"cross_v_{i}"] = k.numpy(), v.numpy()
    order = torch.arange(src.shape[0]).repeat_interleave(prev.shape[0] // src.shape[0])
    cache = model.start_decoding(enc.index_select(order))
    log_probs = []
    for t in range(prev.shape[1]):
        logits, cache = model.decode_step(torch.from_numpy(prev[:, t : t + 1]), cache)
        log_probs.append(torch.log_softmax(logits, dim=-1).numpy())
    caches = {f"self_k_{i}": k.numpy() for i, k in enumerate(cache.self_k)}
    caches.update({f"self_v_{i}": v.numpy() for i, v in enumerate(cache.self_v)})
    return encoder, log_probs, caches


def sample_trajectory_inputs(
    model: SubTransformer, src_len: int, encoder_batch: int, batch: int, steps: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random source (Be, S) with a padded tail in row 0, and random target tokens (B, steps)."""
    rng = np.random.default_rng(seed)
    low, vocab, pad = model.cfg.pad_idx + 1, model.cfg.vocab_size, model.cfg.pad_idx
    src = rng.integers(low, vocab, size=(encoder_batch, src_len), dtype=np.int64)
    src[0, max(1, src_len - 3) :] = pad  # bucket padding must be masked out
    prev = rng.integers(low, vocab, size=(batch, steps), dtype=np.int64)
    return src, prev


def runner_trajectory(
    runner: GraphRunner, src: np.ndarray, prev: np.ndarray
) -> tuple[dict[str, np.ndarray], list[np.ndarray], dict[str, np.ndarray]]:
    """``reference_trajectory``'s outputs, computed by a backend's runner."""
    steps = prev.shape[1]
    decoding = Decoding(runner)
    decoding.start(src)
    encoder = {k: v for k, v in decoding.encoder_outputs().items() if k.startswith("cross_")}  # as PyTorch's
    log_probs = [decoding.advance(prev[:, t]) for t in range(steps)]
    caches = {k: v[:, :, :steps] for k, v in decoding.caches().items()}
    return encoder, log_probs, caches


def check_parity(
    runner: GraphRunner,
    model: SubTransformer,
    steps: int = 4,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    reference: GraphRunner | None = None,
    flips: RoundingFlips | None = None,
) -> ParityReport:
    """Runs ``steps`` teacher-forced decoder steps on ``runner`` and on PyTorch (or on the
    ``reference`` runner: a quantized build's reference is the fake-quantized graph).
    ``flips``: the build quantizes activations; rows may stray as ``RoundingFlips`` allows.

    Raises:
        ParityError: the max abs diff exceeds ``tolerance`` (the message names
            the backend, the diff and the output).
    """
    sig = runner.signature
    steps = min(steps, sig.capacity)
    src, prev = sample_trajectory_inputs(model, sig.src_len, sig.encoder_batch, sig.batch, steps, seed)
    if reference is None:
        ref_enc, ref_log_probs, ref_caches = reference_trajectory(model, pad_source(src, sig), prev)
    else:
        ref_enc, ref_log_probs, ref_caches = runner_trajectory(reference, src, prev)
    expected = "PyTorch" if reference is None else reference.name
    got_enc, got_log_probs, got_caches = runner_trajectory(runner, src, prev)

    diffs = trajectory_diffs((got_enc, got_log_probs, got_caches), (ref_enc, ref_log_probs, ref_caches), tolerance)
    if any(d.shape_error for d in diffs.values()):
        name, got_shape, ref_shape = next(d.shape_error for d in diffs.values() if d.shape_error)
        raise ParityError(f"{runner.name}: output {name} has shape {got_shape}, {expected}'s is {ref_shape}")
    worst = max(diffs.values(), key=lambda d: d.worst)
    strayed = sum(d.strayed for d in diffs.values())
    report = ParityReport(runner.name, worst.worst, worst.worst_name, steps, tolerance, strayed if flips else 0)
    if worst.worst <= tolerance:
        return report
    if flips is None:
        raise ParityError(
            f"{runner.name} differs from {expected} by {worst.worst:.3g} (in {worst.worst_name}), "
            f"above the tolerance {tolerance:g}"
        )
    if diffs["encoder"].strayed:  # no int8 activations there: the plain tolerance
        d = diffs["encoder"]
        raise ParityError(
            f"{runner.name} differs from {expected} by {d.worst:.3g} (in {d.worst_name}), above the tolerance "
            f"{tolerance:g} (the encoder quantizes no activations)"
        )
    for group in ("log_probs", "caches"):
        d = diffs[group]
        if d.worst > flips.max_diff or d.strayed > flips.share * d.rows:
            raise ParityError(
                f"{runner.name} differs from {expected} by more than its activations' rounding explains: "
                f"{d.strayed} of {d.rows} {group} rows beyond {tolerance:g} (at most {flips.share:.0%}), "
                f"the worst by {d.worst:.3g} in {d.worst_name} (at most {flips.max_diff:g})"
            )
    return report


@dataclass
class RowDiffs:
    """One group of outputs compared row by row (a row: a slice along an output's first axis,
    e.g. one beam row of one step's log-probs, or of a cache over every step)."""

    rows: int = 0
    strayed: int = 0  # rows whose max abs diff exceeds the tolerance
    worst: float = 0.0
    worst_name: str = ""
    shape_error: tuple[str, Any, Any] | None = None  # (output, got shape, expected shape)


def trajectory_diffs(got: tuple, expected: tuple, tolerance: float) -> dict[str, RowDiffs]:
    """Two ``runner_trajectory`` results compared: per group (``encoder`` outputs, ``log_probs``
    of every step, ``caches``), how many rows, how many beyond ``tolerance``, the worst."""
    (got_enc, got_log_probs, got_caches), (ref_enc, ref_log_probs, ref_caches) = got, expected
    groups = {
        "encoder": [(k, got_enc[k], v) for k, v in ref_enc.items()],
        "log_probs": [(f"log_probs[step {t}]", g, r) for t, (g, r) in enumerate(zip(got_log_probs, ref_log_probs))],
        "caches": [(k, got_caches[k], v) for k, v in ref_caches.items()],
    }
    diffs = {}
    for group, pairs in groups.items():
        d = diffs[group] = RowDiffs()
        for name, a, b in pairs:
            if a.shape != b.shape:
                d.shape_error = d.shape_error or (name, a.shape, b.shape)
                continue
            if not a.size:
                continue
            by_row = np.abs(a - b).reshape(a.shape[0], -1).max(axis=1)
            by_row[~np.isfinite(by_row)] = np.inf
            d.rows, d.strayed = d.rows + len(by_row), d.strayed + int(np.sum(by_row > tolerance))
            if by_row.max() >= d.worst:
                d.worst, d.worst_name = float(by_row.max()), name
    return diffs
