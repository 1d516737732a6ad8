"""Checkpoints that are not readable hatc checkpoints (empty, truncated, another kind of
file, a torch file from elsewhere, a hatc checkpoint lacking or garbling a field) are
refused with one line naming the file and what is wrong, and exit code 2."""

from __future__ import annotations

import pickle
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from hatc.checkpoint import FORMAT, read_checkpoint, save_checkpoint
from hatc.errors import CheckpointError
from hatc.space import load_space
from hatc.static.model import ModelConfig, SubTransformer


@pytest.fixture(scope="module")
def state(tmp_path_factory, shared_data) -> dict:
    """A hatc SubTransformer checkpoint's fields (the smallest tiny arch, random weights)."""
    from hatc.data.datadir import prepare

    out = tmp_path_factory.mktemp("data") / "m30k"
    m30k = shared_data / "multi30k"
    prepare({"train": str(m30k / "train"), "valid": str(m30k / "val")}, "en", "de", out, vocab_size=600, subset=150)
    space = load_space("tiny")
    arch, cfg = space.smallest(), ModelConfig(600, space.qkv_dim, space.super_embed_dim)
    return {
        "kind": "subnet",
        "space": space.to_dict(),
        "arch": arch.to_dict(),
        "model_config": asdict(cfg),
        "model": SubTransformer(arch, cfg).state_dict(),
        "subword_model": (out / "subword.model").read_bytes(),
    }


def one_line_error(result, *fragments: str) -> str:
    assert result.code == 2, (result.code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def translate(cli, path: Path):
    return cli("translate", "--checkpoint", path, stdin="A dog.\n")


def test_a_good_checkpoint_translates(cli, tmp_path, state):
    path = tmp_path / "good.pt"
    save_checkpoint(state, path)
    (tmp_path / "in.en").write_text("A dog.\n")
    result = cli("translate", "--checkpoint", path, "--input", tmp_path / "in.en")
    assert result.code == 0 and result.stdout.count("\n") == 1, result.stderr


def test_compile_refuses_an_empty_checkpoint(cli, tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    one_line_error(cli("compile", "--checkpoint", path, "--target", "x86", "--out", tmp_path / "art"),
                   str(path), "empty file", "not a readable hatc checkpoint")  # fmt: skip
    assert not (tmp_path / "art").exists()


def test_a_truncated_checkpoint_says_so_in_whole_sentences(cli, tmp_path, state):
    good = tmp_path / "good.pt"
    save_checkpoint(state, good)
    for keep in (0.5, 0.99):
        path = tmp_path / f"cut{keep}.pt"
        data = good.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        line = one_line_error(translate(cli, path), str(path), "not a readable hatc checkpoint", "truncated or corrupt")
        reason = line.split("(truncated or corrupt", 1)[1]
        assert reason == ")" or reason.endswith(".)"), line  # torch's first sentence whole, or none of it


def _foreign_files(folder: Path) -> dict[str, Path]:
    files = {"text": folder / "notes.pt", "pickle": folder / "plain.pkl", "objects": folder / "objects.pt",
             "list": folder / "list.pt", "foreign": folder / "foreign.pt"}  # fmt: skip
    files["text"].write_text("hello, not a checkpoint\n")
    files["pickle"].write_bytes(pickle.dumps({"kind": "supernet"}))
    torch.save({"weights": np.zeros(3)}, files["objects"])  # numpy arrays: refused by weights_only
    torch.save([torch.zeros(2)], files["list"])
    torch.save({"state_dict": {"w": torch.zeros(2)}}, files["foreign"])
    return files


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("text", "not a torch.save zip archive"),
        ("pickle", "not a torch.save zip archive"),
        ("objects", "weights-only load refuses"),
        ("list", "holds a list"),
        ("foreign", "no 'format' field"),
    ],
)
def test_files_of_another_kind_are_not_hatc_checkpoints(cli, tmp_path, which, message):
    path = _foreign_files(tmp_path)[which]
    one_line_error(translate(cli, path), str(path), message)


def _without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s | {"format": "hatc-checkpoint/9"}, "'hatc-checkpoint/9' is not"),
        (lambda s: s | {"kind": "teacher"}, "field 'kind' is 'teacher'"),
        (lambda s: _without(s, "model"), "no model field"),
        (lambda s: _without(s, "arch"), "no arch field"),
        (lambda s: s | {"space": "tiny"}, "field 'space' is a str, not a dict"),
        (lambda s: s | {"space": s["space"] | {"choices": {}}}, "field 'space'"),
        (lambda s: s | {"arch": s["arch"] | {"encoder_embed_dim": 7}}, "field 'arch'"),
        (lambda s: s | {"model_config": s["model_config"] | {"vocab_size": 0}}, "model_config.vocab_size"),
        (lambda s: s | {"model_config": {"vocab": 600}}, "field 'model_config'"),
        (lambda s: s | {"model": {"w": 1}}, "not a dict of named tensors"),
        (lambda s: s | {"model": _without(s["model"], "embed_tokens.weight")}, "lacks tensor 'embed_tokens.weight'"),
        (lambda s: s | {"model": s["model"] | {"embed_tokens.weight": torch.zeros(3, 3)}}, "mis-shaped tensor"),
        (lambda s: s | {"subword_model": b"not sentencepiece"}, "field 'subword_model'"),
    ],
)
def test_damaged_hatc_checkpoints_name_the_field(cli, tmp_path, state, edit, message):
    path = tmp_path / "damaged.pt"
    torch.save({"format": FORMAT, **edit(state)}, path)
    one_line_error(translate(cli, path), str(path), message)


def test_resume_needs_the_training_state(tmp_path, state):
    path = tmp_path / "best.pt"
    save_checkpoint(state, path)
    assert read_checkpoint(path)["kind"] == "subnet"
    with pytest.raises(CheckpointError, match="no optimizer, cursor"):
        read_checkpoint(path, resumable=True)
