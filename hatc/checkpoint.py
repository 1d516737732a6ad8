"""Checkpoints: what training writes and every later command reads.

A checkpoint is one ``torch.save`` dict that loads with ``weights_only=True``
and holds everything needed afterwards: the model weights, the design space,
the architecture (SubTransformer checkpoints), the model config, the subword
model bytes, and the training state (optimizer, schedule, data cursor, RNGs).
Writes go to a temp file that is then renamed, so a crash never leaves a
corrupt checkpoint.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hatc import atomic
from hatc.arch import Architecture
from hatc.data.subword import SubwordModel
from hatc.elastic.supernet import SuperTransformer
from hatc.errors import ArchError, CheckpointError
from hatc.space import SearchSpace, resolve_arch
from hatc.static.model import ModelConfig, SubTransformer

FORMAT = "hatc-checkpoint/1"
KINDS = ("supernet", "subnet")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically writes ``state`` to ``path`` (``hatc.atomic``: temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a hatc checkpoint (``weights_only=True``) or raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("kind") not in KINDS:
        raise CheckpointError(f"{path}: not a hatc checkpoint")
    return state


@dataclass
class LoadedModel:
    """A SubTransformer ready for decoding, with what it came from."""

    model: SubTransformer
    arch: Architecture
    space: SearchSpace
    subword: SubwordModel
    kind: str
    state: dict[str, Any]


def model_config_of(state: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**state["model_config"])


def space_of(state: dict[str, Any]) -> SearchSpace:
    return SearchSpace.from_dict(state["space"], "checkpoint space")


def load_subtransformer(path: str | Path, arch_spec: str | None = None) -> LoadedModel:
    """The SubTransformer that ``--checkpoint CKPT [--arch ARCH]`` means.

    A supernet checkpoint with an arch gives that SubTransformer with inherited
    weights, without one the largest; a subnet checkpoint needs no arch and
    refuses a different one.
    """
    state = read_checkpoint(path)
    space, cfg = space_of(state), model_config_of(state)
    subword = SubwordModel(state["subword_model"])
    if state["kind"] == "subnet":
        arch = Architecture.from_dict(state["arch"], f"{path} (arch)")
        if arch_spec is not None:
            asked, _ = resolve_arch(arch_spec, space)
            if asked != arch:
                raise ArchError(
                    f"{path} is a trained SubTransformer of a fixed architecture; --arch {arch_spec} is a different "
                    "one (drop --arch, or pass a supernet checkpoint)"
                )
        model = SubTransformer(arch, cfg)
        model.load_state_dict(state["model"])
    else:
        arch = resolve_arch(arch_spec, space)[0] if arch_spec is not None else space.largest()
        supernet = SuperTransformer.from_config(space, cfg)
        supernet.load_state_dict(state["model"])
        supernet.set_active_subnet(arch)
        model = supernet.get_active_subnet()
    return LoadedModel(model.eval(), arch, space, subword, state["kind"], state)
