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
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hatc import atomic
from hatc.arch import Architecture
from hatc.data.subword import SubwordModel
from hatc.elastic.supernet import SuperTransformer
from hatc.errors import ArchError, CheckpointError, DataError, SpaceError
from hatc.space import SearchSpace, resolve_arch
from hatc.static.model import ModelConfig, SubTransformer

FORMAT = "hatc-checkpoint/1"
KINDS = ("supernet", "subnet")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically writes ``state`` to ``path`` (``hatc.atomic``: temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


# What every hatc checkpoint holds (with its type), and what a run's last.pt adds to resume it.
REQUIRED = {"kind": str, "space": dict, "model_config": dict, "model": dict, "subword_model": bytes}
TRAINING_STATE = ("optimizer", "cursor", "arch_rng", "torch_rng", "updates", "best_valid", "train_config")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def read_checkpoint(path: str | Path, resumable: bool = False) -> dict[str, Any]:
    """Loads a hatc checkpoint (``weights_only=True``) or raises CheckpointError.

    Every field later commands read is checked here: ``kind``, ``space`` (a valid space),
    ``model_config``, ``model`` (a dict of tensors), ``subword_model`` and, for a subnet,
    ``arch``; with ``resumable`` also the training state ``--resume`` needs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not head:
        raise CheckpointError(
            f"{path}: empty file (0 bytes), not a readable hatc checkpoint; it was cut off while being "
            "written or copied: copy it again, or train again"
        )
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files that are not ours
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on a damaged file; all mean the same here
        raise CheckpointError(f"{path}: {_unreadable(head, e)}") from None
    _check_fields(state, path, resumable)
    return state


def _unreadable(head: bytes, error: Exception) -> str:
    """Why torch.load failed, in one sentence (torch's messages run to paragraphs)."""
    if head != ZIP_MAGIC:
        return "not a readable hatc checkpoint (not a torch.save zip archive: a file of another kind, or corrupt)"
    if isinstance(error, pickle.UnpicklingError):
        return (
            "not a hatc checkpoint (it holds Python objects that a weights-only load refuses; "
            "hatc checkpoints hold only tensors and plain data)"
        )
    reason = _first_sentence(str(error))
    return "not a readable hatc checkpoint (truncated or corrupt" + (f": {reason}" if reason else "") + ")"


def _first_sentence(text: str) -> str:
    """The complete first sentence of ``text``, or "" when it has none short enough to quote."""
    first = text.strip().split("\n", 1)[0]
    match = re.match(r"(.{10,200}?[.!?])(\s|$)", first)
    return match.group(1) if match else ""


def _check_fields(state: Any, path: Path, resumable: bool) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a hatc checkpoint (it holds a {type(state).__name__}, not hatc's dict)")
    if "format" not in state:
        raise CheckpointError(f"{path}: not a hatc checkpoint (no 'format' field; a torch file from elsewhere?)")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']!r} is not {FORMAT!r}, the one hatc reads")
    missing = [k for k in REQUIRED if k not in state]
    if state.get("kind") == "subnet" and "arch" not in state:
        missing.append("arch")
    if resumable:
        missing += [k for k in TRAINING_STATE if k not in state]
    if missing:
        raise CheckpointError(f"{path}: damaged hatc checkpoint: no {', '.join(missing)} field(s)")
    for key, kind in REQUIRED.items():
        if not isinstance(state[key], kind):
            got = type(state[key]).__name__
            raise CheckpointError(f"{path}: damaged hatc checkpoint: field '{key}' is a {got}, not a {kind.__name__}")
    if state["kind"] not in KINDS:
        raise CheckpointError(f"{path}: field 'kind' is {state['kind']!r}; expected one of {', '.join(KINDS)}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise CheckpointError(f"{path}: damaged hatc checkpoint: field 'model' is not a dict of named tensors")
    try:
        space = SearchSpace.from_dict(state["space"], f"{path}: field 'space'")
        if state["kind"] == "subnet":
            space.validate(Architecture.from_dict(state["arch"], f"{path}: field 'arch'"), f"{path}: field 'arch'")
    except (SpaceError, ArchError) as e:
        raise CheckpointError(str(e)) from None
    try:
        cfg = ModelConfig(**state["model_config"])
    except TypeError as e:  # an unknown or missing field
        raise CheckpointError(f"{path}: field 'model_config': {e}") from None
    for name in ("vocab_size", "qkv_dim", "super_embed_dim"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: field 'model_config.{name}' is {value!r}, not a positive integer")


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """``module.load_state_dict(weights)``; a tensor missing, extra or of another shape is a
    CheckpointError naming ``source`` and the first such tensor."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    shaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    for problem, keys in (("lacks", missing), ("has an unexpected", extra), ("has a mis-shaped", shaped)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointError(
                f"{source}: damaged hatc checkpoint: its weights do not fit its architecture and model config "
                f"(it {problem} tensor '{keys[0]}'{more})"
            )
    module.load_state_dict(weights)


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
    try:
        subword = SubwordModel(state["subword_model"])
    except DataError as e:
        raise CheckpointError(f"{path}: field 'subword_model': {e}") from None
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
        load_weights(model, state["model"], path)
    else:
        arch = resolve_arch(arch_spec, space)[0] if arch_spec is not None else space.largest()
        supernet = SuperTransformer.from_config(space, cfg)
        load_weights(supernet, state["model"], path)
        supernet.set_active_subnet(arch)
        model = supernet.get_active_subnet()
    return LoadedModel(model.eval(), arch, space, subword, state["kind"], state)
