"""Running a compiled artifact without PyTorch.

Imports only numpy, the subword library, and (when an artifact is loaded) the
TVM runtime or onnxruntime; a test runs it in a process where importing torch
fails. The modules:

- ``artifact``: the artifact layout, opening a directory or .tar.gz, path and sha256 checks.
- ``manifest``: the manifest's fields the runtime reads, their types and ranges checked on opening.
- ``signing``: Ed25519 signatures over the manifest (``--sign`` / ``--trust``).
- ``backends``: runners over the artifact's TVM libraries (local or RPC) or ONNX graphs.
- ``signature``, ``runners``: the graphs' contract, and running them (ONNX Runtime here, TVM in backends).
- ``beam``: greedy and beam search in numpy, fairseq's rule as ``hatc.decode`` applies it.
- ``translator``: text in, text out.
"""

from hatc.decoding import DecodeOptions
from hatc.runtime.artifact import Artifact, ArtifactError, open_artifact
from hatc.runtime.translator import SourceTooLong, Translator

__all__ = ["Artifact", "ArtifactError", "DecodeOptions", "SourceTooLong", "Translator", "open_artifact"]
