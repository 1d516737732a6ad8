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


class ParityError(HatcError):
    """A backend's outputs differ from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class ParityReport:
    backend: str
    max_abs_diff: float  # over every compared value
    worst: str  # which output it was
    steps: int
    tolerance: float

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
) -> ParityReport:
    """Runs ``steps`` teacher-forced decoder steps on ``runner`` and on PyTorch (or on the
    ``reference`` runner: a quantized build's reference is the fake-quantized graph).

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
    worst, worst_name = 0.0, ""
    for name, got, ref in pairs:
        if got.shape != ref.shape:
            raise ParityError(f"{runner.name}: output {name} has shape {got.shape}, {expected}'s is {ref.shape}")
        diff = float(np.max(np.abs(got - ref))) if got.size else 0.0
        if not np.isfinite(diff):
            diff = float("inf")
        if diff >= worst:
            worst, worst_name = diff, name
    report = ParityReport(runner.name, worst, worst_name, steps, tolerance)
    if not worst <= tolerance:
        raise ParityError(
            f"{runner.name} differs from {expected} by {worst:.3g} (in {worst_name}), above the tolerance {tolerance:g}"
        )
    return report
