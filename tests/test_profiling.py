"""Kernel profiles (hatc.compile.profiling): TVM's per-kernel times with bytes and FLOPs,
ONNX Runtime's profiler trace read per run, and the machine's roofline figures."""

from __future__ import annotations

import numpy as np
import pytest

from hatc.compile.profiling import _ort_table, last_level_cache_bytes, measure_machine

pytest.importorskip("tvm")


def _linear_relu_onnx(path, k: int = 64, n: int = 32):
    """relu(x @ w) as an ONNX file, w an initializer (a Relax parameter once imported, as in hatc's graphs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((k, n), "float32"), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_tvm_kernel_times_name_each_kernel_with_its_bytes_and_flops(tmp_path):
    import tvm

    from hatc.compile import tuning_db
    from hatc.compile.profiling import tir_flops, tvm_kernel_times
    from hatc.compile.tvm_build import build_module, import_onnx
    from hatc.targets import load_target, tvm_target_of

    target = load_target("x86")
    tvm_target = tvm_target_of(target)
    graph = import_onnx(_linear_relu_onnx(tmp_path / "linear.onnx"), "linear", ["x"], ["y"])
    executable = build_module(graph, target)
    with tvm_target:
        scheduled, _ = tuning_db.apply_database(tuning_db._fused(graph.module, tvm_target), tvm_target, None)
    flops = tir_flops(scheduled)
    dev = tvm.cpu()
    args = [
        tvm.runtime.tensor(np.ones((1, 64), "float32"), dev),
        *(tvm.runtime.tensor(p.numpy(), dev) for p in graph.params),
    ]
    kernels = {k.name: k for k in tvm_kernel_times(executable, flops, args, runs=3)}
    fused = [k for name, k in kernels.items() if "matmul" in name]
    assert len(fused) == 1, kernels
    matmul = fused[0]
    assert matmul.calls == 1 and matmul.ms > 0
    assert matmul.bytes == (64 + 64 * 32 + 32) * 4  # x and w read, the (1, 32) result written
    assert matmul.flops == pytest.approx(2 * 64 * 32, rel=0.1)


def test_ort_trace_is_read_per_run_and_per_op_type():
    """Three runs in the trace, two profiled: medians over those two, bytes and FLOPs from one run."""

    def node(ts: int, dur: int, op: str, inputs, outputs):
        return {
            "cat": "Node", "name": f"n_{op}_kernel_time", "ts": ts, "dur": dur,
            "args": {"op_name": op, "input_type_shape": inputs, "output_type_shape": outputs},
        }  # fmt: skip

    trace = []
    for run, start in enumerate((0, 1000, 2000)):
        trace.append({"cat": "Session", "name": "model_run", "ts": start, "dur": 900})
        trace.append(
            node(start + 10, 100 * (run + 1), "MatMul", [{"float": [1, 64]}, {"float": [64, 32]}], [{"float": [1, 32]}])
        )
        trace.append(node(start + 200, 10, "Relu", [{"float": [1, 32]}], [{"float": [1, 32]}]))
        trace.append(node(start + 300, 30, "Relu", [{"float": [1, 32]}], [{"float": [1, 32]}]))
    table = {k.name: k for k in _ort_table(trace, runs=2)}
    assert table["MatMul"].ms == pytest.approx((0.2 + 0.3) / 2)  # runs 2 and 3: 200 and 300 us
    assert table["MatMul"].calls == 1 and table["MatMul"].flops == 2 * 64 * 32
    assert table["MatMul"].bytes == (64 + 64 * 32 + 32) * 4
    assert table["Relu"].calls == 2 and table["Relu"].ms == pytest.approx(0.04) and table["Relu"].flops == 0


def test_machine_roofline_figures_are_measured():
    machine = measure_machine(threads=1, repeats=2)
    assert machine.last_level_cache_mb * 2**20 == last_level_cache_bytes() > 0
    assert machine.stream_read_gb_s > 0 and machine.cache_read_gb_s > 0 and machine.gemm_gflop_s > 0
    assert machine.to_dict()["threads"] == 1
