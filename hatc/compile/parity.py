"""Parity: a backend running the exported graphs against the PyTorch SubTransformer.

The reference is the static model's own ``encode`` / ``start_decoding`` /
``decode_step`` (growing cache), not the export wrappers, so a check covers
the wrappers, the exporter and the backend at once. Compared: the encoder's
cross-attention keys/values, the log-probs of every step, and the filled
slots of the final self-attention caches.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    times a weight. On the 60-minute Multi30k supernet (``benchmarks/rounding_flips.py``,
    bucket 64, beam 4, 16 seeds of 4 steps), about one log-prob row in ten moved so, by at most
    0.069 (the others: median 7e-6), and up to 24% of one seed's compared rows (log-probs,
    caches, encoder outputs) strayed beyond 1e-4. A wrong kernel, layout or scale moves every
    row, and by much more.

    A row (an output's slice along its first axis: a beam row of one step) passes within
    ``tolerance``; at most ``share`` of them may stray beyond it, none by more than ``max_diff``.
    """

    max_diff: float = 0.25
    share: float = 0.5


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

    pairs = [(k, got_enc[k], v) for k, v in ref_enc.items()]
    pairs += [(f"log_probs[step {t}]", g, r) for t, (g, r) in enumerate(zip(got_log_probs, ref_log_probs))]
    pairs += [(k, got_caches[k], v) for k, v in ref_caches.items()]
    worst, worst_name, rows, strayed = 0.0, "", 0, 0
    for name, got, ref in pairs:
        if got.shape != ref.shape:
            raise ParityError(f"{runner.name}: output {name} has shape {got.shape}, {expected}'s is {ref.shape}")
        if not got.size:
            continue
        by_row = np.abs(got - ref).reshape(got.shape[0], -1).max(axis=1)
        by_row[~np.isfinite(by_row)] = np.inf
        rows, strayed = rows + len(by_row), strayed + int(np.sum(by_row > tolerance))
        if by_row.max() >= worst:
            worst, worst_name = float(by_row.max()), name
    report = ParityReport(runner.name, worst, worst_name, steps, tolerance, strayed if flips else 0)
    if worst <= tolerance:
        return report
    if flips is None:
        raise ParityError(
            f"{runner.name} differs from {expected} by {worst:.3g} (in {worst_name}), above the tolerance {tolerance:g}"
        )
    if worst > flips.max_diff or strayed > flips.share * rows:
        raise ParityError(
            f"{runner.name} differs from {expected} by more than its activations' rounding explains: {strayed} of "
            f"{rows} rows beyond {tolerance:g} (at most {flips.share:.0%}), the worst by {worst:.3g} in {worst_name} "
            f"(at most {flips.max_diff:g})"
        )
    return report
