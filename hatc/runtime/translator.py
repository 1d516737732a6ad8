"""Translating with an artifact: tokenizer, length buckets, runners, search.

The whole path is torch-free: numpy, the subword library, and the TVM runtime
or onnxruntime. Sources are encoded as ``subword ids + [EOS]`` exactly as
``hatc.decode.translate_lines`` does (an empty line is then the single token
EOS, never an all-padding source), padded to the smallest bucket that holds
them, and decoded one sentence at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hatc.data.subword import EOS, SubwordModel
from hatc.decoding import DecodeOptions
from hatc.runtime.artifact import SUBWORD, Artifact, ArtifactError, open_artifact
from hatc.runtime.backends import WeightStore, load_runner
from hatc.runtime.beam import decode
from hatc.runtime.runners import Decoding, GraphRunner
from hatc.runtime.signature import bucket_for


class SourceTooLong(ArtifactError):
    """A sentence has more subwords than the artifact's largest length bucket."""


def options_of(artifact: Artifact) -> DecodeOptions:
    """The manifest's decoding defaults."""
    d = artifact.manifest["decoding"]
    return DecodeOptions(
        beam=int(d["beam"]),
        lenpen=float(d["lenpen"]),
        max_len_a=float(d["max_len_a"]),
        max_len_b=int(d["max_len_b"]),
        max_len=int(d["max_len"]),
    )


class Translator:
    """An artifact ready to translate; runners are created per bucket on first use.

    Args:
        artifact: an opened artifact, or a path (directory or .tar.gz) to open.
        device: a TVM device to run on instead of the target's default.
        session: a TVM RPC session (``tvm.rpc`` / a tracker's ``request``): the
            libraries are uploaded and run on that remote device.
        threads: intra-op threads of ONNX Runtime, or of TVM (set before TVM's runtime starts;
            ``hatc.runtime.backends.tvm_threads`` reports the count it uses).
        trust: a public key file: open ``artifact`` (a path) only if that key signed it.
    """

    def __init__(
        self,
        artifact: Artifact | str | Path,
        device: Any = None,
        session: Any = None,
        threads: int | None = None,
        trust: str | Path | None = None,
    ):
        self.artifact = artifact if isinstance(artifact, Artifact) else open_artifact(artifact, trust=trust)
        self.options = options_of(self.artifact)
        self.max_source_len = max(self.artifact.buckets)
        tokenizer = self.artifact.manifest.get("tokenizer", {}).get("file", SUBWORD)
        self.subword = SubwordModel(self.artifact.path(tokenizer).read_bytes())
        self._device, self._session, self._threads = device, session, threads
        self._weights = (
            WeightStore(self.artifact.path(self.artifact.manifest["weights"]), self.artifact.manifest.get("dequantize"))
            if self.artifact.backend == "tvm"
            else None
        )
        self._runners: dict[int, GraphRunner] = {}
        if self.artifact.backend == "tvm" and session is None and device is None:
            # An rpi4 library on x86, a CUDA one without a GPU: say so before any work.
            self.runner(self.artifact.buckets[0])

    @property
    def compiled_beam(self) -> int:
        """Rows of the decoder graph: the widest beam this artifact can search."""
        return int(self.artifact.manifest["decoding"]["beam"])

    def runner(self, bucket: int) -> GraphRunner:
        if bucket not in self._runners:
            self._runners[bucket] = load_runner(
                self.artifact, bucket, self._weights, self._device, self._session, self._threads
            )
        return self._runners[bucket]

    def resolve_options(
        self, beam: int | None = None, lenpen: float | None = None, max_len: int | None = None
    ) -> DecodeOptions:
        """The manifest's defaults with the caller's overrides (``max_len`` can only lower the cap)."""
        options = self.options
        if max_len is not None:
            options = replace(options, max_len=max(1, min(options.max_len, max_len)))
        if beam is not None:
            if not 1 <= beam <= self.compiled_beam:
                raise ArtifactError(
                    f"{self.artifact.source}: compiled for beams up to {self.compiled_beam}; --beam {beam} needs "
                    f"'hatc compile --beam {beam}'"
                )
            options = replace(options, beam=beam)
        if lenpen is not None:
            options = replace(options, lenpen=lenpen)
        return options

    def encode(self, lines: Sequence[str]) -> list[list[int]]:
        """Source ids (EOS-terminated); a line past the largest bucket is refused by number."""
        encoded = [ids + [EOS] for ids in self.subword.encode_many(list(lines))]
        for number, ids in enumerate(encoded, start=1):
            if len(ids) > self.max_source_len:
                raise SourceTooLong(
                    f"input line {number} has {len(ids)} subwords; the artifact takes at most "
                    f"{self.max_source_len} (its largest length bucket)"
                )
        return encoded

    def translate_ids(self, src: list[int], options: DecodeOptions, bucket: int | None = None) -> list[int]:
        """One source (ids ending in EOS) -> target ids; ``bucket`` forces a larger bucket than needed."""
        bucket = bucket or bucket_for(len(src), tuple(self.artifact.buckets))
        return decode(Decoding(self.runner(bucket)), src, options)

    def translate(
        self,
        lines: Sequence[str],
        beam: int | None = None,
        lenpen: float | None = None,
        max_len: int | None = None,
        on_sentence: Callable[[int], None] = lambda _: None,
    ) -> list[str]:
        """Detokenized translations of ``lines``, in order (manifest defaults unless overridden)."""
        return self.translate_sources(self.encode(lines), self.resolve_options(beam, lenpen, max_len), on_sentence)

    def translate_sources(
        self,
        sources: Sequence[list[int]],
        options: DecodeOptions,
        on_sentence: Callable[[int], None] = lambda _: None,
    ) -> list[str]:
        """Detokenized translations of sources that ``encode`` made."""
        results = []
        for src in sources:
            results.append(self.subword.decode(self.translate_ids(src, options)))
            on_sentence(1)
        return results

    def close(self) -> None:
        self._runners.clear()
        self.artifact.close()

    def __enter__(self) -> Translator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
