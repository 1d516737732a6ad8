"""Compiling SubTransformers for devices: ONNX export, ONNX Runtime and TVM builds.

Nothing here imports TVM at module import time (it is imported inside functions),
so ``import hatc.compile`` stays cheap. The modules:

- ``graphs``: thin torch wrappers that re-express a static SubTransformer as an
  encoder graph and a fixed-cache decoder-step graph; ``export``: their ONNX export.
- ``packing``: beam-sized matmul weights packed into the GEMV kernel's layout.
- ``schedules``: hatc's own GEMV schedule for the decoder step's linear layers.
- ``tvm_build``: Relax import, builds for a target, the TVM runner.
- ``tune_config``, ``workloads``, ``trial_budget``, ``candidates``, ``tuning``,
  ``tuning_db``, ``tune_job``: what ``hatc tune`` tunes, where trials go, how
  candidates are built and measured, the database and builds that apply it.
- ``profiling``: per-kernel times against the machine's roofline.
- ``compiler``, ``checks``, ``parity``, ``weights``: ``hatc compile`` and its checks.
"""
