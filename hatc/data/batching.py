"""Token-bucketed batches, reproducible per (seed, epoch), so a run resumes
at the exact batch it stopped at."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hatc.data.subword import BOS, PAD


def token_batches(
    src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """Index batches of similar-length pairs whose padded size fits ``max_tokens``.

    Pairs are sorted by length after a seeded shuffle (random tie-breaking);
    the batch order is shuffled with the same generator.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(src_lens))
    longest = np.maximum(src_lens, tgt_lens)[order]
    order = order[np.argsort(longest, kind="stable")]
    batches, start, width = [], 0, 0
    for i, idx in enumerate(order):
        width = max(width, int(max(src_lens[idx], tgt_lens[idx])))
        if (i + 1 - start) * width > max_tokens and i > start:
            batches.append(order[start:i])
            start, width = i, int(max(src_lens[idx], tgt_lens[idx]))
    batches.append(order[start:])
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) ids ending with EOS, right-padded
    prev: torch.Tensor  # (B, T) BOS + target without its EOS
    target: torch.Tensor  # (B, T) target ending with EOS
    ntokens: int  # non-pad target tokens

    def to(self, device: torch.device) -> Batch:
        return Batch(self.src.to(device), self.prev.to(device), self.target.to(device), self.ntokens)


def collate(src: list[np.ndarray], tgt: list[np.ndarray]) -> Batch:
    b = len(src)
    s_len, t_len = max(len(x) for x in src), max(len(x) for x in tgt)
    src_t = torch.full((b, s_len), PAD, dtype=torch.long)
    prev_t = torch.full((b, t_len), PAD, dtype=torch.long)
    tgt_t = torch.full((b, t_len), PAD, dtype=torch.long)
    for i, (s, t) in enumerate(zip(src, tgt)):
        src_t[i, : len(s)] = torch.from_numpy(s)
        tgt_t[i, : len(t)] = torch.from_numpy(t)
        prev_t[i, 0] = BOS
        prev_t[i, 1 : len(t)] = torch.from_numpy(t[:-1])
    return Batch(src_t, prev_t, tgt_t, int(sum(len(t) for t in tgt)))


@dataclass
class BatchCursor:
    """Where training is in the data: saved in checkpoints."""

    epoch: int = 1
    index: int = 0  # next batch of this epoch (in this rank's share)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}
