"""Opening an artifact: a directory (or a .tar.gz of one) that ``hatc compile`` wrote.

Layout (paths relative to the artifact directory)::

    manifest.json            what it is, how it was made, and sha256 of every other file
    subword.model            the joint sentencepiece model
    weights.npz              tvm backend: every graph's weights, deduplicated (numpy, no pickle)
    lib/encoder.s16.so       tvm backend: one library per graph and length bucket
    lib/decoder_step.s16.so
    graphs/encoder.s16.onnx  onnxruntime backend: the ONNX graphs instead of libraries,
    graphs/weights.bin       their weights as ONNX external data, deduplicated

Opening verifies every sha256 listed in the manifest before anything is
loaded, so a tampered, truncated or missing file is refused by name. Imports
neither torch nor TVM.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hatc.errors import HatcError

FORMAT = "hatc-artifact/1"
MANIFEST = "manifest.json"
SUBWORD = "subword.model"
WEIGHTS = "weights.npz"
BACKENDS = ("tvm", "onnxruntime")
_REQUIRED = ("format", "backend", "arch", "target", "decoding", "buckets", "graphs", "files")


class ArtifactError(HatcError):
    """An artifact is missing, malformed, tampered with, or cannot run here."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_archive(path: Path) -> bool:
    return Path(path).name.endswith((".tar.gz", ".tgz"))


@dataclass
class Artifact:
    """A verified artifact directory and its manifest.

    ``root`` is where the files are; for an archive that is a temporary
    directory that lives as long as this object (``close()`` removes it).
    """

    root: Path
    manifest: dict[str, Any]
    source: Path  # what the user named: the directory or the archive
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def buckets(self) -> list[int]:
        return [int(b) for b in self.manifest["buckets"]]

    @property
    def target_name(self) -> str:
        return self.manifest["target"]["name"]

    def path(self, relative: str) -> Path:
        return self.root / relative

    def graph(self, bucket: int) -> dict[str, Any]:
        """The manifest's entry for one length bucket (signature, files, weight keys)."""
        return self.manifest["graphs"][str(bucket)]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Artifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(root: Path, source: Path) -> dict[str, Any]:
    """Parses and checks ``manifest.json`` (errors name ``source``)."""
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{source}: no {MANIFEST}; not a hatc artifact")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{source}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{source}: {MANIFEST} has format {found!r}; this hatc reads {FORMAT!r}")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise ArtifactError(f"{source}: {MANIFEST} lacks field(s) {', '.join(missing)}")
    if manifest["backend"] not in BACKENDS:
        raise ArtifactError(f"{source}: unknown backend {manifest['backend']!r}; expected one of {', '.join(BACKENDS)}")
    return manifest


def verify_files(root: Path, manifest: dict[str, Any], source: Path) -> None:
    """Every file the manifest lists exists inside ``root`` and has its sha256."""
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{source}: {MANIFEST} lists no files")
    base = root.resolve()
    for relative, expected in sorted(files.items()):
        path = (root / relative).resolve()
        if base not in path.parents:  # a manifest must not point outside its artifact
            raise ArtifactError(f"{source}: {MANIFEST} names a file outside the artifact: {relative}")
        if not path.is_file():
            raise ArtifactError(f"{source}: file {relative} is missing")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{source}: file {relative} does not match its sha256 (tampered or truncated)")


def _extract(archive: Path) -> tuple[tempfile.TemporaryDirectory, Path]:
    """Unpacks an artifact archive into a temporary directory; returns it and the artifact root."""
    tmp = tempfile.TemporaryDirectory(prefix="hatc-artifact-")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp.name, filter="data")  # no absolute paths, links out, devices
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        tmp.cleanup()
        raise ArtifactError(f"{archive}: truncated or not an artifact archive ({e})") from None
    top = Path(tmp.name)
    entries = list(top.iterdir())
    # hatc writes one top-level directory; an archive of the files themselves works too.
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else top
    return tmp, root


def open_artifact(path: str | Path) -> Artifact:
    """Opens and verifies an artifact directory or ``.tar.gz``.

    Raises:
        ArtifactError: missing path, unreadable archive, bad manifest, or a
            file whose sha256 differs from the manifest's (named).
    """
    source = Path(path)
    if not source.exists():
        raise ArtifactError(f"{source}: no such artifact")
    tmp = None
    if source.is_dir():
        root = source
    elif is_archive(source):
        tmp, root = _extract(source)
    else:
        raise ArtifactError(f"{source}: an artifact is a directory or a .tar.gz")
    try:
        manifest = read_manifest(root, source)
        verify_files(root, manifest, source)
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    return Artifact(root, manifest, source, tmp)


def write_archive(directory: Path, archive: Path) -> Path:
    """``directory`` as a .tar.gz whose one top-level entry is its name; atomic (temp file, rename)."""
    archive = Path(archive)
    tmp = archive.with_name(f".{archive.name}.tmp")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(directory, arcname=archive.name.removesuffix(".tar.gz").removesuffix(".tgz"))
        tmp.replace(archive)
    finally:
        tmp.unlink(missing_ok=True)
    return archive


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
