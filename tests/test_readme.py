"""README.md's set-up is true: two commands, the first taking torch's CPU build on any
machine (PyTorch's CPU index) at the version CI installs, the second exactly CI's test command."""

from __future__ import annotations

import re

from conftest import REPO

CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "README.md's Set-up has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _ci_lines() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_setup_is_two_commands_and_the_first_takes_torchs_cpu_build():
    install, tests = _setup_commands()
    steps = [step.strip() for step in install.split("&&")]
    torch_step = next(step for step in steps if "torch==" in step)
    assert CPU_INDEX in torch_step and "-e" not in torch_step.split()  # the CPU index serves torch, not hatc
    ci_torch = next(line for line in _ci_lines() if "torch==" in line)
    assert re.search(r"torch==\S+", torch_step).group() == re.search(r"torch==\S+", ci_torch).group()
    assert any("install -e '.[tvm,dev]'" in step for step in steps)
    assert tests == _ci_lines()[-1]  # CI ends with exactly README's test command
