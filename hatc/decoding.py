"""The decoding settings, defined once for both beam searches: ``hatc.decode`` (PyTorch,
for checkpoints) and ``hatc.runtime.beam`` (numpy, for artifacts), the CLI and the
artifact manifest. Standard library only: the torch-free runtime imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BEAM = 4
DEFAULT_LENPEN = 0.6  # HAT's WMT setting
DEFAULT_MAX_LEN_A = 1.2  # fairseq's max_len_a / max_len_b: at most a * source + b target tokens
DEFAULT_MAX_LEN_B = 10


@dataclass(frozen=True)
class DecodeOptions:
    beam: int = DEFAULT_BEAM  # 1: greedy
    lenpen: float = DEFAULT_LENPEN  # a finished hypothesis scores sum(log p) / len ** lenpen (len counts the EOS)
    max_len_a: float = DEFAULT_MAX_LEN_A  # at most a * source length + b target tokens before the EOS
    max_len_b: int = DEFAULT_MAX_LEN_B
    max_len: int = 256  # hard cap on those tokens (the model's positions bound it too)

    def limit(self, src_len: int) -> int:
        """Target tokens (EOS not counted) a source of ``src_len`` tokens (EOS counted) may produce."""
        return max(1, min(self.max_len, int(self.max_len_a * src_len + self.max_len_b)))
