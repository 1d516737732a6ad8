"""The joint subword model (sentencepiece unigram, byte fallback).

Normalization, which the round trip ``decode(encode(x))`` is exact after:
sentencepiece's ``nmt_nfkc`` rule, i.e. Unicode NFKC, whitespace runs
collapsed to one space, leading and trailing whitespace removed. Byte
fallback means no character ever becomes <unk>.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from hatc.errors import DataError

PAD, UNK, BOS, EOS = 0, 1, 2, 3


class SubwordModel:
    """Encodes text to ids and back; serializes to bytes (kept in checkpoints)."""

    def __init__(self, model_bytes: bytes):
        self.model_bytes = model_bytes
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError, TypeError):
            raise DataError("the subword model is corrupt (not a sentencepiece model)") from None
        if (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()) != (PAD, UNK, BOS, EOS):
            raise DataError("the subword model was not made by hatc (special token ids differ)")

    @classmethod
    def train(cls, sentences: Iterable[str], vocab_size: int, num_threads: int = 2) -> SubwordModel:
        """Learns a joint model over both languages' sentences."""
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=writer,
                vocab_size=vocab_size,
                model_type="unigram",
                character_coverage=1.0,
                byte_fallback=True,
                pad_id=PAD,
                unk_id=UNK,
                bos_id=BOS,
                eos_id=EOS,
                normalization_rule_name="nmt_nfkc",
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as e:
            # e.g. a vocabulary larger than the corpus can fill
            raise DataError(f"cannot learn a subword model with vocab size {vocab_size}: {e}") from None
        return cls(writer.getvalue())

    @classmethod
    def load(cls, path) -> SubwordModel:
        return cls(open(path, "rb").read())

    def __len__(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """Text from ids; special tokens (pad, bos, eos) are dropped."""
        return self._sp.decode([i for i in ids if i not in (PAD, BOS, EOS)])

    def normalize(self, text: str) -> str:
        return self._sp.normalize(text)
