"""Compiling SubTransformers for devices: ONNX export, ONNX Runtime and TVM builds.

Nothing here imports TVM at module import time (``tvm_build`` imports it inside
its functions), so ``import hatc.compile`` stays cheap. The modules:

- ``signature``: the two graphs' inputs, outputs and shapes, length buckets
  (torch-free; a runtime reads it).
- ``graphs``: thin torch wrappers that re-express a static SubTransformer as an
  encoder graph and a fixed-cache decoder-step graph.
- ``export``: ONNX export of those wrappers.
- ``runners``: a numpy-level decoding driver over any backend, ONNX Runtime
  and PyTorch runners, and parity checks.
- ``tvm_build``: Relax import, builds for a target, the TVM runner.
"""
