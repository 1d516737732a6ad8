"""The thread count asked for reaches the runtimes (issue 12, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("tvm")


@pytest.mark.parametrize("threads", [1, 2])
def test_tvm_runs_the_threads_asked_for(threads):
    """TVM sizes its pool once, when its runtime starts: the runtime sets it before importing TVM
    and reports what TVM uses (a fresh process: TVM not loaded yet). TVM caps it at the cores."""
    if threads > len(os.sched_getaffinity(0)):
        pytest.skip("fewer cores than threads")
    code = (
        "import os; os.environ.pop('TVM_NUM_THREADS', None)\n"
        "from hatc.runtime.backends import _import_tvm, tvm_threads\n"
        f"_import_tvm({threads}); print(tvm_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(threads)


def test_onnxruntime_runs_the_threads_asked_for(tmp_path):
    import torch

    from hatc.compile.export import export_onnx
    from hatc.runtime.runners import OrtRunner
    from hatc.space import load_space
    from hatc.static.model import ModelConfig, SubTransformer

    space = load_space("tiny")
    model = SubTransformer(space.smallest(), ModelConfig(64, space.qkv_dim, space.super_embed_dim)).eval()
    with torch.no_grad():
        graphs = export_onnx(model, tmp_path / "g", 16, batch=1)
    runner = OrtRunner(graphs.encoder, graphs.decoder, graphs.signature, threads=2)
    assert runner._enc.get_session_options().intra_op_num_threads == 2
    assert runner._dec.get_session_options().intra_op_num_threads == 2
