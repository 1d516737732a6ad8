"""An artifact's manifest.json, edited or damaged, is refused when it is opened: one line
naming the manifest, the field, its value and what it may be, exit 2 (never a ValueError
from somewhere in decoding). A signed manifest is checked after its signature."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from test_artifact import checkpoint, no_tuning_databases, one_line_error, sentences, subword

__all__ = ["checkpoint", "no_tuning_databases", "sentences", "subword"]  # fixtures shared with test_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, checkpoint) -> Path:
    """An onnxruntime artifact (no TVM build: quick) of buckets 16 and 32, beam 4."""
    out = tmp_path_factory.mktemp("artifacts") / "ort"
    result = run_cli("compile", "--checkpoint", checkpoint, "--target", "x86", "--out", out, "--backend",
                     "onnxruntime", "--buckets", "16,32", "--json")  # fmt: skip
    assert result.code == 0, result.stderr
    return out


def edited(artifact: Path, folder: Path, edit) -> Path:
    """A copy of ``artifact`` whose manifest ``edit`` changed in place."""
    copy = folder / "copy"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return copy


def _set(path: str, value):
    """An edit that sets the dotted field ``path`` (``del`` removes it)."""

    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[key]
        if value == "del":
            del node[last]
        else:
            node[last] = value

    return edit


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("decoding.beam", 99, "field decoding.beam is 99; expected an integer from 1 to 4"),
        ("decoding.beam", 0, "field decoding.beam is 0; expected an integer from 1 to 4"),
        ("decoding.beam", "4", "field decoding.beam is '4'; expected an integer"),
        ("decoding.beam", 2.5, "field decoding.beam is 2.5"),
        ("decoding.beam", True, "field decoding.beam is True"),
        ("decoding.max_len", -5, "field decoding.max_len is -5; expected an integer >= 1"),
        ("decoding.max_len_a", -1.0, "field decoding.max_len_a is -1.0; expected a finite number >= 0"),
        ("decoding.max_len_b", None, "field decoding.max_len_b is None; expected an integer >= 0"),
        ("decoding.lenpen", "high", "field decoding.lenpen is 'high'; expected a finite number"),
        ("decoding.lenpen", "del", "lacks field decoding.lenpen"),
        ("decoding", [4], "field decoding is [4]; expected an object"),
        ("backend", "tensorrt", "field backend is 'tensorrt'; expected one of tvm, onnxruntime"),
        ("buckets", [], "field buckets is []; expected a non-empty list"),
        ("buckets", [16, "32"], "field buckets[1] is '32'"),
        ("buckets", [16], "field graphs is ['16', '32']; expected one entry per bucket (16)"),
        ("graphs.16.signature.batch", 0, "field graphs.16.signature.batch is 0; expected an integer >= 1"),
        ("graphs.16.signature.src_len", 32, "field graphs.16.signature.src_len is 32; expected an integer from 16"),
        ("graphs.32.signature.encoder_batch", 2, "field graphs.32.signature.encoder_batch is 2"),
        ("graphs.16.signature.vocab_size", -1, "field graphs.16.signature.vocab_size is -1"),
        ("graphs.16.signature.self_heads", [3], "graphs.16.signature.self_heads"),
        ("graphs.16.signature.precision", "fp8", "field graphs.16.signature is"),
        ("graphs.16.encoder", "del", "lacks field graphs.16.encoder"),
        ("graphs.16.encoder.file", 7, "field graphs.16.encoder.file is 7; expected a path"),
        ("target.device", "tpu", "field target.device is 'tpu'; expected one of cpu, cuda"),
        ("target.name", "", "field target.name is ''"),
        ("target.rpc_key", 9190, "field target.rpc_key is 9190"),
        ("tokenizer", "subword.model", "field tokenizer is 'subword.model'; expected an object"),
        ("weights", "del", "lacks field(s) weights"),
        ("files.subword.model", "abc", "field files.subword.model is 'abc'; expected a sha256"),
        ("arch", None, "field arch is None; expected an object"),
    ],
)
def test_a_bad_field_is_one_line_naming_manifest_field_value_and_range(
    cli, artifact, tmp_path, sentences, field, value, expected
):
    if field.startswith("files."):
        copy = edited(artifact, tmp_path, lambda m: m["files"].__setitem__(field[len("files.") :], value))
    else:
        copy = edited(artifact, tmp_path, _set(field, value))
    one_line_error(cli("translate", "--artifact", copy, "--input", sentences), f"{copy}: manifest.json", expected)


def test_the_manifest_as_compiled_translates_and_a_lower_default_beam_is_accepted(cli, artifact, tmp_path, sentences):
    assert cli("translate", "--artifact", artifact, "--input", sentences).code == 0
    copy = edited(artifact, tmp_path, _set("decoding.beam", 2))
    result = cli("translate", "--artifact", copy, "--input", sentences)
    assert result.code == 0 and result.stdout.count("\n") == sentences.read_text().count("\n"), result.stderr


def test_a_signed_manifest_is_checked_after_its_signature(cli, artifact, tmp_path, sentences):
    from hatc.runtime.signing import load_private_key, signature_for

    keys = tmp_path / "keys"
    assert run_cli("keys", "generate", "--out", keys).code == 0
    copy = edited(artifact, tmp_path, _set("decoding.beam", 99))
    signed = signature_for((copy / "manifest.json").read_bytes(), load_private_key(keys / "hatc.key"))
    (copy / "manifest.sig").write_bytes(signed)
    trusted = cli("translate", "--artifact", copy, "--input", sentences, "--trust", keys / "hatc.pub")
    one_line_error(trusted, "field decoding.beam is 99")
    other = tmp_path / "other"
    assert run_cli("keys", "generate", "--out", other).code == 0
    untrusted = cli("translate", "--artifact", copy, "--input", sentences, "--trust", other / "hatc.pub")
    one_line_error(untrusted, "not by the trusted key")  # the signature comes first
