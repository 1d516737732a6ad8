"""What an artifact may make the runtime load, and signed artifacts.

A hostile manifest must not get a library loaded that the artifact does not
pin: each case below is refused with one line and exit 2, and the library it
points at (one that writes a marker file the moment it is loaded) never runs.
A control case shows the marker library does run when an artifact pins it, so
the refusals are not vacuous. Signing: ``hatc keys generate``, ``hatc compile
--sign`` and ``hatc translate --trust`` (or HATC_TRUST).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from test_artifact import checkpoint, hatc_without_torch, no_tuning_databases, one_line_error, sentences, subword

__all__ = ["checkpoint", "no_tuning_databases", "sentences", "subword"]  # fixtures shared with test_artifact

MARKER_LIB = r"""
#include <stdio.h>
__attribute__((constructor)) static void hatc_test_loaded(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("loaded\n", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two key pairs: ours (signs the artifacts) and another one."""
    out = {}
    for name in ("ours", "other"):
        directory = tmp_path_factory.mktemp(f"keys-{name}")
        result = run_cli("keys", "generate", "--out", directory, "--json")
        assert result.code == 0, result.stderr
        out[name] = directory
    return out


@pytest.fixture(scope="module")
def signed(tmp_path_factory, checkpoint, keys) -> Path:
    """An onnxruntime artifact (no TVM build: quick), signed with our key."""
    out = tmp_path_factory.mktemp("artifacts") / "signed"
    result = run_cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", out, "--backend",
                     "onnxruntime", "--buckets", "16,32", "--sign", keys["ours"] / "hatc.key", "--json")  # fmt: skip
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["signed_by"]
    return out


@pytest.fixture
def marker_lib(tmp_path) -> tuple[Path, Path]:
    """A shared library that writes ``marker`` when it is loaded (dlopen runs its constructor)."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the marker library")
    marker, source, lib = tmp_path / "LOADED", tmp_path / "marker.c", tmp_path / "marker.so"
    source.write_text(MARKER_LIB % marker)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", lib, source], check=True)
    return lib, marker


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tvm_artifact(signed: Path, root: Path, library: str, lib_file: Path | None) -> Path:
    """A tvm-backend artifact made from ``signed``'s tokenizer whose graphs are ``library``.

    ``lib_file`` is copied to ``root/library`` when given (and then listed with
    its sha256); the manifest lists every file it holds and nothing else.
    """
    root.mkdir(parents=True)
    manifest = json.loads((signed / "manifest.json").read_text())
    shutil.copy(signed / "subword.model", root / "subword.model")
    np.savez(root / "weights.npz", unused=np.zeros(1, np.float32))
    if lib_file is not None:
        (root / library).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib_file, root / library)
    entry = manifest["graphs"]["16"]
    for graph in ("encoder", "decoder_step"):
        entry[graph] = {"file": library, "params": []}
    manifest |= {"backend": "tvm", "graphs": {"16": entry}, "buckets": [16], "weights": "weights.npz"}
    manifest["files"] = {
        p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()
    }  # fmt: skip
    write_manifest(root, manifest)
    return root


def write_manifest(root: Path, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def relist(root: Path, manifest: dict) -> dict:
    """``manifest`` with its files list rebuilt from what ``root`` holds (as an attacker would)."""
    manifest["files"] = {
        p.relative_to(root).as_posix(): sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", "manifest.sig")
    }
    return manifest


# ----- the control: a pinned library does get loaded --------------------------------------
def test_the_marker_library_runs_when_an_artifact_pins_it(signed, marker_lib, tmp_path, sentences):
    lib, marker = marker_lib
    artifact = tvm_artifact(signed, tmp_path / "pinned", "lib/encoder.s16.so", lib)
    result = hatc_without_torch("translate", "--artifact", artifact, "--input", sentences)
    assert marker.exists(), result.stderr  # loaded (and then it fails: it is no TVM module)
    assert result.returncode != 0


# ----- a manifest that points elsewhere ---------------------------------------------------
@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_library_outside_the_artifact_is_refused_unloaded(cli, signed, marker_lib, tmp_path, sentences, where):
    lib, marker = marker_lib
    artifact = tvm_artifact(signed, tmp_path / "a", "lib/encoder.s16.so", lib)
    evil = tmp_path / "evil.so"
    shutil.copy(lib, evil)
    name = "../evil.so" if where == "parent" else str(evil)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["graphs"]["16"]["encoder"]["file"] = name
    manifest["files"][name] = sha256(evil)  # listed with the right hash: still outside
    write_manifest(artifact, manifest)
    one_line_error(cli("translate", "--artifact", artifact, "--input", sentences), name, "not a plain relative path")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["lib//encoder.s16.so", "./lib/encoder.s16.so", "lib\\encoder.s16.so", "lib/"])
def test_paths_that_are_not_plain_are_refused(cli, signed, marker_lib, tmp_path, sentences, name):
    lib, marker = marker_lib
    artifact = tvm_artifact(signed, tmp_path / "a", "lib/encoder.s16.so", lib)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["graphs"]["16"]["encoder"]["file"] = name
    manifest["files"][name] = manifest["files"]["lib/encoder.s16.so"]
    write_manifest(artifact, manifest)
    one_line_error(cli("translate", "--artifact", artifact, "--input", sentences), "not a plain relative path")
    assert not marker.exists()


def test_a_listed_path_through_a_file_is_one_line(cli, signed, tmp_path, sentences):
    copy = tmp_path / "copy"
    shutil.copytree(signed, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["subword.model/x"] = "0" * 64
    write_manifest(copy, manifest)
    one_line_error(cli("translate", "--artifact", copy, "--input", sentences), "subword.model/x")


def test_a_referenced_file_missing_from_the_files_list_is_refused(cli, signed, marker_lib, tmp_path, sentences):
    lib, marker = marker_lib
    artifact = tvm_artifact(signed, tmp_path / "a", "lib/encoder.s16.so", lib)
    manifest = json.loads((artifact / "manifest.json").read_text())
    del manifest["files"]["lib/encoder.s16.so"]  # referenced by the graphs, hash never checked
    write_manifest(artifact, manifest)
    one_line_error(
        cli("translate", "--artifact", artifact, "--input", sentences), "graphs.16.encoder.file", "does not pin"
    )
    assert not marker.exists()


def test_an_unlisted_extra_library_is_refused(cli, signed, marker_lib, tmp_path, sentences):
    lib, marker = marker_lib
    copy = tmp_path / "copy"
    shutil.copytree(signed, copy)
    (copy / "lib").mkdir()
    shutil.copy(lib, copy / "lib" / "extra.so")
    one_line_error(cli("translate", "--artifact", copy, "--input", sentences), "lib/extra.so", "not listed")
    assert not marker.exists()


def test_a_path_through_a_symlink_is_refused(cli, signed, marker_lib, tmp_path, sentences):
    lib, marker = marker_lib
    artifact = tvm_artifact(signed, tmp_path / "a", "lib/encoder.s16.so", lib)
    outside = tmp_path / "outside"
    shutil.move(artifact / "lib", outside)
    (artifact / "lib").symlink_to(outside, target_is_directory=True)  # same listed path, same hash, a link
    one_line_error(cli("translate", "--artifact", artifact, "--input", sentences), "lib", "symbolic link")
    assert not marker.exists()


def test_a_symlinked_file_is_refused(cli, signed, tmp_path, sentences):
    copy = tmp_path / "copy"
    shutil.copytree(signed, copy)
    real = tmp_path / "subword.model"
    shutil.move(copy / "subword.model", real)
    (copy / "subword.model").symlink_to(real)
    one_line_error(cli("translate", "--artifact", copy, "--input", sentences), "subword.model", "symbolic link")


# ----- signatures ---------------------------------------------------------------------------
def test_keys_generate_writes_a_private_key_only_its_owner_reads(cli, tmp_path):
    result = cli("keys", "generate", "--out", tmp_path / "k", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert len(summary["key_id"]) == 16
    assert stat.S_IMODE(os.stat(tmp_path / "k" / "hatc.key").st_mode) == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "k" / "hatc.key").read_bytes()
    assert b"PUBLIC KEY" in (tmp_path / "k" / "hatc.pub").read_bytes()
    before = (tmp_path / "k" / "hatc.key").read_bytes()
    one_line_error(cli("keys", "generate", "--out", tmp_path / "k"), "hatc.key", "--force")
    assert (tmp_path / "k" / "hatc.key").read_bytes() == before  # refused: nothing replaced
    assert cli("keys", "generate", "--out", tmp_path / "k", "--force").code == 0
    assert (tmp_path / "k" / "hatc.key").read_bytes() != before
    (tmp_path / "a-file").write_text("")
    one_line_error(cli("keys", "generate", "--out", tmp_path / "a-file"), "a-file", "cannot write the key pair")


def test_a_signed_artifact_translates_under_trust(cli, signed, keys, checkpoint, sentences, tmp_path):
    assert (signed / "manifest.sig").is_file()
    assert "manifest.sig" not in json.loads((signed / "manifest.json").read_text())["files"]
    expected = cli("translate", "--checkpoint", checkpoint, "--input", sentences)
    trusted = hatc_without_torch("translate", "--artifact", signed, "--input", sentences,
                                 "--trust", keys["ours"] / "hatc.pub")  # fmt: skip
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout == expected.stdout
    archive = cli("translate", "--artifact", f"{signed}.tar.gz", "--input", sentences,
                  "--trust", keys["ours"] / "hatc.pub")  # fmt: skip
    assert archive.code == 0, archive.stderr
    assert archive.stdout == expected.stdout


def test_an_unsigned_artifact_is_refused_under_trust(cli, signed, keys, tmp_path, sentences, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(signed, copy)
    (copy / "manifest.sig").unlink()
    assert cli("translate", "--artifact", copy, "--input", sentences).code == 0  # fine without --trust
    one_line_error(
        cli("translate", "--artifact", copy, "--input", sentences, "--trust", keys["ours"] / "hatc.pub"), "not signed"
    )
    monkeypatch.setenv("HATC_TRUST", str(keys["ours"] / "hatc.pub"))  # a key pinned on a device
    one_line_error(cli("translate", "--artifact", copy, "--input", sentences), "not signed")
    # over RPC: refused before any device is asked for (no tracker listens there)
    one_line_error(cli("translate", "--artifact", copy, "--input", sentences, "--tracker", "127.0.0.1:1"), "not signed")


def test_a_pinned_key_is_for_artifacts_only(cli, signed, keys, checkpoint, sentences, monkeypatch, tmp_path):
    from hatc.runtime import Translator, open_artifact
    from hatc.runtime.signing import SigningError

    monkeypatch.setenv("HATC_TRUST", str(keys["ours"] / "hatc.pub"))
    assert cli("translate", "--checkpoint", checkpoint, "--input", sentences).code == 0  # a checkpoint is no artifact
    one_line_error(cli("translate", "--checkpoint", checkpoint, "--trust", keys["ours"] / "hatc.pub"), "--trust")
    with open_artifact(signed, trust=keys["ours"] / "hatc.pub") as opened:  # a directory: checked in a private copy
        assert opened.root != signed and (opened.root / "manifest.sig").is_file()
        kept = opened.root
    assert not kept.exists()
    copy = tmp_path / "copy"
    shutil.copytree(signed, copy)
    (copy / "manifest.sig").unlink()
    with pytest.raises(SigningError, match="not signed"):
        Translator(copy, trust=keys["ours"] / "hatc.pub")


def test_an_artifact_signed_by_another_key_is_refused_unloaded(cli, signed, keys, marker_lib, tmp_path, sentences):
    lib, marker = marker_lib
    artifact = tvm_artifact(signed, tmp_path / "a", "lib/encoder.s16.so", lib)  # a valid layout, by someone else
    from hatc.runtime.signing import load_private_key, signature_for  # signed as an attacker with a key would

    other = load_private_key(keys["other"] / "hatc.key")
    (artifact / "manifest.sig").write_bytes(signature_for((artifact / "manifest.json").read_bytes(), other))
    one_line_error(
        cli("translate", "--artifact", artifact, "--input", sentences, "--trust", keys["ours"] / "hatc.pub"),
        "signed by key",
        "not by the trusted key",
    )
    assert not marker.exists()


def test_a_changed_file_and_manifest_hash_break_the_signature(cli, signed, keys, tmp_path, sentences):
    copy = tmp_path / "copy"
    shutil.copytree(signed, copy)
    model = copy / "graphs" / "encoder.s16.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    manifest = relist(copy, json.loads((copy / "manifest.json").read_text()))  # hashes agree again
    write_manifest(copy, manifest)
    pub = keys["ours"] / "hatc.pub"
    one_line_error(
        cli("translate", "--artifact", copy, "--input", sentences, "--trust", pub), "does not match manifest.json"
    )


def test_bad_keys_are_refused_before_any_work(cli, signed, checkpoint, tmp_path, sentences):
    not_a_key = tmp_path / "hatc.pub"
    not_a_key.write_text("hello\n")
    one_line_error(
        cli("translate", "--artifact", signed, "--input", sentences, "--trust", not_a_key), "not a PEM public key"
    )
    one_line_error(
        cli("translate", "--artifact", signed, "--input", sentences, "--trust", tmp_path / "none.pub"), "no such"
    )
    out = tmp_path / "never"
    one_line_error(
        cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", out, "--sign", tmp_path / "none.key"),
        "none.key",
    )
    assert not out.exists()
    one_line_error(cli("translate", "--checkpoint", checkpoint, "--trust", not_a_key), "--trust")


# ----- RPC on an open network --------------------------------------------------------------
def test_rpc_bound_beyond_loopback_warns_that_it_runs_uploaded_code(cli):
    from hatc.cli.rpc import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
    with socket.socket() as busy:  # the command stops at the busy port, after its warning
        busy.bind(("0.0.0.0", 0))
        port = busy.getsockname()[1]
        exposed = cli("rpc", "tracker", "--host", "0.0.0.0", "--port", port)
        local = cli("rpc", "tracker", "--host", "127.0.0.1", "--port", port)
    assert exposed.code == 2 and "no authentication" in exposed.stderr and "trusted network" in exposed.stderr
    assert local.code == 2 and "no authentication" not in local.stderr


def test_an_unsigned_archive_is_refused_before_it_is_unpacked(signed, keys, tmp_path, monkeypatch):
    import tarfile

    from hatc.runtime import artifact
    from hatc.runtime.signing import SigningError

    copy = tmp_path / "unsigned"
    shutil.copytree(signed, copy)
    (copy / "manifest.sig").unlink()
    archive = tmp_path / "unsigned.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(copy, arcname="unsigned")
    monkeypatch.setattr(artifact, "_extract", lambda *a: pytest.fail("unpacked before the signature was checked"))
    with pytest.raises(SigningError, match="not signed"):
        artifact.open_artifact(archive, trust=keys["ours"] / "hatc.pub")


def test_an_archive_with_a_link_out_is_refused_by_name(cli, signed, tmp_path, sentences):
    import io
    import tarfile

    archive = tmp_path / "linked.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(signed, arcname="linked")
        link = tarfile.TarInfo("linked/lib/encoder.s16.so")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link, io.BytesIO())
    one_line_error(cli("translate", "--artifact", archive, "--input", sentences), "refusing a member")
