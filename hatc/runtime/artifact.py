"""Opening an artifact: a directory (or a .tar.gz of one) that ``hatc compile`` wrote.

Layout (paths relative to the artifact directory)::

    manifest.json            what it is, how it was made, and sha256 of every other file
    subword.model            the joint sentencepiece model
    weights.npz              tvm backend: every graph's weights, deduplicated (numpy, no pickle)
    lib/encoder.s16.so       tvm backend: one library per graph and length bucket
    lib/decoder_step.s16.so
    graphs/encoder.s16.onnx  onnxruntime backend: the ONNX graphs instead of libraries,
    graphs/weights.bin       their weights as ONNX external data, deduplicated

Opening checks the manifest's fields (``hatc.runtime.manifest``) and the layout
before any file but the manifest is read: every
path the manifest references (libraries, graphs, weights, tokenizer) must be
relative, inside the artifact, reached through no symbolic link, and listed in
``files``, and the artifact may hold nothing else (but ``manifest.sig``). Then
it verifies every listed sha256, so a tampered, truncated or missing file is
refused by name. With a trusted public key it first checks the manifest's
signature (``hatc.runtime.signing``). Imports neither torch nor TVM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from hatc import atomic
from hatc.errors import ArtifactError
from hatc.runtime.manifest import check_manifest
from hatc.runtime.signing import SIGNATURE, load_public_key, verify_signature, verify_signature_bytes

FORMAT = "hatc-artifact/1"
MANIFEST = "manifest.json"
SUBWORD = "subword.model"
WEIGHTS = "weights.npz"


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


def read_manifest_bytes(root: Path, source: Path) -> bytes:
    """``manifest.json``'s bytes, read once: what a signature covers is what gets parsed."""
    path = root / MANIFEST
    if path.is_symlink():
        raise ArtifactError(f"{source}: {MANIFEST} is a symbolic link; refusing it")
    if not path.is_file():
        raise ArtifactError(f"{source}: no {MANIFEST}; not a hatc artifact")
    return path.read_bytes()


def parse_manifest(data: bytes, source: Path) -> dict[str, Any]:
    """Parses ``manifest.json``'s bytes and checks every field the runtime reads
    (``hatc.runtime.manifest``); errors name ``source``, the field and its value."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{source}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{source}: {MANIFEST} has format {found!r}; this hatc reads {FORMAT!r}")
    check_manifest(manifest, f"{source}: {MANIFEST}")
    return manifest


def referenced_files(manifest: dict[str, Any], source: Path) -> dict[str, str]:
    """Every file the runtime would open, by the manifest field that names it.

    Raises:
        ArtifactError: a graph entry without its file, or a path that is not a string.
    """
    refs: dict[str, Any] = {}
    graphs = manifest["graphs"]
    if not isinstance(graphs, dict) or not graphs:
        raise ArtifactError(f"{source}: {MANIFEST} field graphs lists no length buckets")
    for bucket, entry in graphs.items():
        for graph in ("encoder", "decoder_step"):
            try:
                refs[f"graphs.{bucket}.{graph}.file"] = entry[graph]["file"]
            except (KeyError, TypeError):
                raise ArtifactError(f"{source}: {MANIFEST} field graphs.{bucket}.{graph}.file is missing") from None
    refs["weights"] = manifest.get("weights")
    tokenizer = manifest.get("tokenizer") or {}
    refs["tokenizer.file"] = tokenizer.get("file", SUBWORD) if isinstance(tokenizer, dict) else None
    for field_name, value in refs.items():
        if not isinstance(value, str):
            raise ArtifactError(f"{source}: {MANIFEST} field {field_name} is {value!r}, not a path")
    return refs


def _check_relative(relative: object, where: str, source: Path) -> str:
    """A plain relative path inside the artifact: no absolute path, no '..', no '.', no backslash."""
    path = PurePosixPath(relative) if isinstance(relative, str) else None
    if (
        path is None
        or not relative
        or path.is_absolute()
        or "\\" in relative
        or path.as_posix() != relative
        or any(part in ("", ".", "..") for part in relative.split("/"))
    ):
        raise ArtifactError(
            f"{source}: {MANIFEST} {where} {relative!r} is not a plain relative path inside the artifact; refusing it"
        )
    return relative


def _check_no_links(root: Path, relative: str, source: Path) -> None:
    """Each component of ``relative`` below ``root`` exists and is not a symbolic link; the last a regular file."""
    current = root
    parts = relative.split("/")
    for i, part in enumerate(parts):
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            raise ArtifactError(f"{source}: file {relative} is missing") from None
        except (OSError, ValueError) as e:  # through a file, a NUL, a name too long
            raise ArtifactError(f"{source}: {MANIFEST} lists {relative!r}, which cannot be read ({e})") from None
        if stat.S_ISLNK(mode):
            raise ArtifactError(f"{source}: {relative} goes through a symbolic link; refusing it")
        if i == len(parts) - 1 and not stat.S_ISREG(mode):
            raise ArtifactError(f"{source}: {relative} is not a regular file")


def check_layout(root: Path, manifest: dict[str, Any], source: Path) -> None:
    """The manifest's paths are safe and listed, and the artifact holds nothing unlisted.

    Reads no file but the manifest (already read): run before anything is loaded.

    Raises:
        ArtifactError: naming the field or path that breaks a rule.
    """
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{source}: {MANIFEST} lists no files")
    for relative in files:
        _check_relative(relative, "lists", source)
    for field_name, relative in referenced_files(manifest, source).items():
        _check_relative(relative, f"field {field_name} names", source)
        if relative not in files:
            raise ArtifactError(
                f"{source}: {MANIFEST} field {field_name} names {relative}, which its files list does not pin; "
                "refusing it"
            )
    for relative in files:
        _check_no_links(root, relative, source)
    expected = set(files) | {MANIFEST, SIGNATURE}
    for directory, dirnames, filenames in os.walk(root):
        here = Path(directory)
        for name in sorted(dirnames + filenames):
            relative = (here / name).relative_to(root).as_posix()
            if (here / name).is_symlink():
                raise ArtifactError(f"{source}: {relative} is a symbolic link; an artifact holds none")
            if name in filenames and relative not in expected:
                raise ArtifactError(f"{source}: {relative} is not listed in {MANIFEST}; refusing an unlisted file")


def verify_files(root: Path, manifest: dict[str, Any], source: Path) -> None:
    """Every file the manifest lists has its sha256 (run after ``check_layout``)."""
    for relative, expected in sorted(manifest["files"].items()):
        if sha256_file(root / relative) != expected:
            raise ArtifactError(f"{source}: file {relative} does not match its sha256 (tampered or truncated)")


def _member_bytes(tar: tarfile.TarFile, name: str, limit: int = 16 << 20) -> bytes | None:
    """A regular file of the archive at its top or under its one top-level directory, or None."""
    for member in tar.getmembers():
        parts = member.name.strip("/").split("/")
        if parts[-1] == name and len(parts) <= 2 and member.isfile() and member.size <= limit:
            handle = tar.extractfile(member)
            return handle.read() if handle is not None else None
    return None


def _check_archive_signature(archive: Path, public_key: Any) -> None:
    """With a trusted key, an archive's manifest signature is checked before anything is unpacked."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            manifest, signature = _member_bytes(tar, MANIFEST), _member_bytes(tar, SIGNATURE)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ArtifactError(f"{archive}: truncated or not an artifact archive ({e})") from None
    if manifest is None:
        raise ArtifactError(f"{archive}: no {MANIFEST}; not a hatc artifact")
    verify_signature_bytes(manifest, signature, public_key, archive)


def _extract(archive: Path) -> tuple[tempfile.TemporaryDirectory, Path]:
    """Unpacks an artifact archive into a temporary directory; returns it and the artifact root."""
    tmp = tempfile.TemporaryDirectory(prefix="hatc-artifact-")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp.name, filter="data")  # no absolute paths, links out, devices
    except tarfile.FilterError as e:
        tmp.cleanup()
        raise ArtifactError(f"{archive}: refusing a member that tar's data filter rejects ({e})") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        tmp.cleanup()
        raise ArtifactError(f"{archive}: truncated or not an artifact archive ({e})") from None
    top = Path(tmp.name)
    entries = list(top.iterdir())
    # hatc writes one top-level directory; an archive of the files themselves works too.
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else top
    return tmp, root


def _private_copy(directory: Path) -> tuple[tempfile.TemporaryDirectory, Path]:
    """A copy of an artifact directory that only this user can write (links copied as links,
    so the layout check still refuses them); a copy also ends any hard link to outside files."""
    tmp = tempfile.TemporaryDirectory(prefix="hatc-artifact-")
    root = Path(tmp.name) / directory.name
    try:
        shutil.copytree(directory, root, symlinks=True)
    except (OSError, shutil.Error) as e:
        tmp.cleanup()
        raise ArtifactError(f"{directory}: cannot read the artifact ({e})") from None
    return tmp, root


def open_artifact(path: str | Path, trust: str | Path | None = None) -> Artifact:
    """Opens and verifies an artifact directory or ``.tar.gz``.

    Args:
        trust: a public key file (``hatc.pub``): the artifact must carry a
            signature by that key over its manifest, checked first. A
            directory is then copied to a private temporary directory and
            checked and loaded from there, so a file swapped after the check
            is never loaded (an archive is always unpacked privately).

    Raises:
        ArtifactError: missing path, unreadable archive, bad manifest, a path
            outside the artifact or not pinned by it, an unlisted file, or a
            file whose sha256 differs from the manifest's (named).
        SigningError: with ``trust``: unsigned, another key, or a manifest
            changed after signing.
    """
    source = Path(path)
    public_key = load_public_key(Path(trust)) if trust is not None else None  # a bad key fails before any work
    if not source.exists():
        raise ArtifactError(f"{source}: no such artifact")
    tmp = None
    if source.is_dir() and public_key is not None:
        tmp, root = _private_copy(source)  # what is verified is what gets loaded, whoever can write SOURCE
    elif source.is_dir():
        root = source
    elif is_archive(source):
        if public_key is not None:
            _check_archive_signature(source, public_key)  # an unsigned archive is never unpacked
        tmp, root = _extract(source)
    else:
        raise ArtifactError(f"{source}: an artifact is a directory or a .tar.gz")
    try:
        data = read_manifest_bytes(root, source)
        if public_key is not None:
            verify_signature(data, root / SIGNATURE, public_key, source)
        manifest = parse_manifest(data, source)
        check_layout(root, manifest, source)
        verify_files(root, manifest, source)
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    return Artifact(root, manifest, source, tmp)


def write_archive(directory: Path, archive: Path) -> Path:
    """``directory`` as a .tar.gz whose one top-level entry is its name; atomic (``hatc.atomic``)."""
    archive = Path(archive)
    with atomic.replacing(archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(directory, arcname=archive.name.removesuffix(".tar.gz").removesuffix(".tgz"))
    return archive


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
