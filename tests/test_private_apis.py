"""Private APIs hatc leans on, each isolated in one function: these tests fail loudly
when an upgrade of typer, torch or TVM moves them, instead of hatc degrading silently.

- typer's vendored click exceptions (``hatc.cli._click_exceptions``): usage errors
  must stay one line and exit 2.
- torch's aten-to-ONNX registry (``hatc.compile.export._reused_onnx_registry``): the
  cache must really be used (else each export rebuilds it: slower, not wrong).
- TVM's ``tvm.s_tir.tensor_intrin`` package replaced in ``sys.modules``
  (``hatc.compile.tuning.lazy_tensor_intrinsics``): the target's intrinsics must
  still import and register.
"""

from __future__ import annotations

import subprocess
import sys


def test_typers_click_exceptions_are_what_typer_raises(cli):
    from hatc.cli import _click_exceptions

    exceptions = _click_exceptions()
    assert issubclass(exceptions.NoArgsIsHelpError, exceptions.ClickException)
    result = cli("--no-such-option")
    assert result.code == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No such option: --no-such-option (see "), lines
    assert cli().code == 0  # no arguments: the help, exit 0


def test_torchs_onnx_registry_is_built_once_per_opset():
    from torch.onnx._internal.exporter import _registration  # the private path the cache patches

    from hatc.compile import export

    assert "from_torchlib" in _registration.ONNXRegistry.__dict__
    export._REGISTRIES.clear()
    with export._reused_onnx_registry():
        first = _registration.ONNXRegistry.from_torchlib(opset_version=18)
        again = _registration.ONNXRegistry.from_torchlib(opset_version=18)
    assert first is again and list(export._REGISTRIES.items()) == [(18, first)]
    outside = _registration.ONNXRegistry.from_torchlib(opset_version=18)
    assert outside is not first  # restored: torch's own method outside the context


LAZY_INTRINSICS = """
import sys
import tvm
from hatc.compile.tuning import lazy_tensor_intrinsics
lazy_tensor_intrinsics(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}))
package = sys.modules["tvm.s_tir.tensor_intrin"]
assert package.__doc__.startswith("tensor intrinsics, imported on demand by hatc"), package
assert "tvm.s_tir.tensor_intrin.x86" in sys.modules
assert "tvm.s_tir.tensor_intrin.cuda" not in sys.modules
from tvm.s_tir.tensor_intrin import arm_cpu  # any other submodule still imports on demand
from tvm.s_tir import TensorIntrin
TensorIntrin.get("dot_16x4_vnni")  # registered by the x86 module
print("ok")
"""


def test_tvms_tensor_intrinsics_still_import_through_the_lazy_package():
    result = subprocess.run([sys.executable, "-c", LAZY_INTRINSICS], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
