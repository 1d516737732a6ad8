"""benchmarks/gpu_check.sh where no GPU is: one line, exit code 3, nothing done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run_script(tmp_path, path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "",
           "GPU_CHECK_WORKDIR": str(tmp_path / "work"), "GPU_CHECK_OUT": str(tmp_path / "out.json")}  # fmt: skip
    # Its own process group: should it go on to train, the timeout stops all of it.
    proc = subprocess.Popen(["/bin/bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(
    ("fake_nvidia_smi", "says"),
    [(False, "no NVIDIA GPU here (nvidia-smi not found)"), (True, "torch.cuda.is_available() is false")],
    ids=["no nvidia-smi", "torch sees no GPU"],  # not "cuda": the script's own `pytest -k cuda` would run them
)
def test_without_a_gpu_it_says_so_and_does_nothing(tmp_path, fake_nvidia_smi, says):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = str(bin_dir)  # nothing on PATH: no nvidia-smi
    if fake_nvidia_smi:  # an nvidia-smi, but torch sees no GPU (CPU torch here; CUDA_VISIBLE_DEVICES empty)
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
        path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    before = sorted((REPO / "benchmarks" / "results").iterdir())
    done = run_script(tmp_path, path)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1 and says in done.stderr
    assert done.stderr.startswith("gpu_check: ") and "nothing done" in done.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "out.json").exists()
    assert sorted((REPO / "benchmarks" / "results").iterdir()) == before
