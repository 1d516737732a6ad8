"""Atomic file writes: a reader sees the old file or the new one, never a part.

Every file hatc replaces whole (checkpoints, predictors, search state, plots,
archives, keys) is written through this module, with one policy:

- The data goes to a temp file in the destination's directory (same
  filesystem, so the rename is atomic), made by ``tempfile.mkstemp``: a fresh,
  hidden name ``.NAME.XXXXXXXX.tmp.SUFFIX`` (the destination's suffix kept, for
  writers that pick a format by it), created with mode 0600.
- On success the temp file is fsynced, given its mode, renamed over the
  destination, and the directory is fsynced, so after a crash or power loss
  the path holds the old file or the whole new one.
- On any exception (KeyboardInterrupt included) the temp file is removed and
  the destination is left as it was.
- Mode: ``mode=None`` gives what ``open()`` would (0666 less the umask);
  an explicit mode is applied exactly (not masked by the umask). The temp file
  is 0600 until the data is complete, so a private key is never readable by
  others, not even for a moment.

Standard library only: the torch-free runtime uses it too. Appending to a log
(JSON lines) is not a replacement and does not belong here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yields a temp path for a writer that needs one (``torch.save``, ``savefig``,
    ``np.savez``, ``tarfile``); renames it to ``path`` when the block succeeds.

    Args:
        path: The file to replace; its directory must exist.
        mode: Permission bits of the written file (None: 0666 less the umask).

    Yields:
        The temp file's path (it exists, empty, and keeps ``path``'s suffix).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Replaces ``path`` with ``data`` atomically (see the module's policy); returns ``path``."""
    with replacing(path, mode) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, encoding: str = "utf-8", mode: int | None = None) -> Path:
    """Replaces ``path`` with ``text`` atomically (see the module's policy); returns ``path``."""
    with replacing(path, mode) as tmp, open(tmp, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Makes the rename itself durable; skipped where a directory cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (``os.umask`` sets it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
