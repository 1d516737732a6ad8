"""``hatc.atomic``: the one way hatc replaces a file."""

import os
import stat
import subprocess
import sys

import pytest

from hatc import atomic


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_replaces_on_success_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    assert atomic.write_text(path, "new\n") == path
    assert path.read_text() == "new\n"
    atomic.write_bytes(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    assert _names(tmp_path) == ["state.json"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path, error):
    path = tmp_path / "model.pt"
    path.write_text("old")
    with pytest.raises(error), atomic.replacing(path) as tmp:
        tmp.write_text("half of the new")
        raise error()
    assert path.read_text() == "old"
    assert _names(tmp_path) == ["model.pt"]


def test_a_failing_rename_leaves_no_temp(tmp_path):
    path = tmp_path / "taken"
    (path / "inside").mkdir(parents=True)  # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        atomic.write_text(path, "new")
    assert _names(tmp_path) == ["taken"]


def test_temp_is_private_beside_the_target_and_keeps_its_suffix(tmp_path):
    path = tmp_path / "pareto.png"
    with atomic.replacing(path, mode=0o644) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".pareto.png.") and tmp.suffix == ".png"
        assert _mode(tmp) == 0o600  # a private key's bytes are never readable by others
        tmp.write_bytes(b"png")
    assert _mode(path) == 0o644


def test_creates_with_the_requested_mode(tmp_path):
    key = tmp_path / "hatc.key"
    key.write_text("old")
    key.chmod(0o644)
    atomic.write_bytes(key, b"secret", mode=0o600)
    assert key.read_bytes() == b"secret" and _mode(key) == 0o600
    script = atomic.write_text(tmp_path / "python", "#!/bin/sh\n", mode=0o755)
    assert _mode(script) == 0o755


def test_default_mode_is_what_open_would_create(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic.write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert _mode(path) == 0o640


def test_imports_only_the_standard_library():
    code = (
        "import sys; before = set(sys.modules); import hatc.atomic; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names); "
        "assert new == {'hatc'}, new"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
