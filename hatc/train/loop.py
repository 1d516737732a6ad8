"""The training loop shared by ``hatc train supernet`` and ``hatc train subnet``.

HAT's recipe: one SubTransformer sampled per optimizer update, the same on
every worker and every accumulated micro-batch (rank 0 samples and
broadcasts); label-smoothed cross-entropy; Adam (0.9, 0.98); warm-up then
inverse-sqrt or cosine; token-bucketed batches. Runs under ``torchrun`` use
DistributedDataParallel (gloo on CPU, NCCL on GPU) and bf16 autocast on CUDA.

Everything that decides what happens next (model, optimizer, data cursor,
sampler and torch RNG states) is in the checkpoint, so stopping after N
updates and resuming gives the same weights as running straight through.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import hatc
from hatc.arch import Architecture
from hatc.checkpoint import load_weights, model_config_of, read_checkpoint, save_checkpoint, space_of
from hatc.data.batching import BatchCursor, collate, token_batches
from hatc.data.datadir import DataDir, ParallelSplit
from hatc.data.subword import PAD
from hatc.elastic.supernet import SuperTransformer
from hatc.errors import CheckpointError, HatcError, Interrupted
from hatc.space import SearchSpace
from hatc.static.model import ModelConfig, SubTransformer
from hatc.train.config import TrainConfig


@dataclass
class TrainTask:
    """What to train: the supernet of a space, or one fixed SubTransformer."""

    kind: str  # "supernet" | "subnet"
    space: SearchSpace
    arch: Architecture | None = None  # subnet only
    inherit: Path | None = None  # subnet: start from this supernet checkpoint's weights


@dataclass
class UpdateStats:
    update: int
    max_updates: int | None
    epoch: int
    loss: float  # label-smoothed, per target token
    nll: float
    tokens_per_s: float  # target tokens over all workers
    lr: float
    arch: Architecture
    elapsed_s: float


@dataclass
class TrainStart:
    """What a run is about to do: from which update, and its stopping rule (after a resume, the run's own)."""

    updates: int
    max_updates: int | None
    minutes: float | None


@dataclass
class TrainResult:
    updates: int
    stopped: str  # "max_updates" | "minutes"
    valid: dict[str, float] = field(default_factory=dict)
    best_valid: float | None = None
    checkpoint: Path | None = None


Events = Callable[[str, Any], None]  # ("start", TrainStart) | ("update", UpdateStats) | ("valid", dict) | ("log", str)


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over non-pad tokens of fairseq's label-smoothed loss and of the NLL."""
    lprobs = F.log_softmax(logits.float(), dim=-1)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.sum(-1)
    eps_i = eps / (lprobs.shape[-1] - 1)
    loss = (1.0 - eps - eps_i) * nll + eps_i * smooth
    keep = target.ne(PAD)
    return loss[keep].sum(), nll[keep].sum()


# ----- distributed plumbing ------------------------------------------------
def _dist_setup() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def _broadcast(payload: Any, world: int) -> Any:
    if world == 1:
        return payload
    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _StopOnSignal:
    """First Ctrl-C / SIGTERM asks the loop to stop after the current update
    (and save); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----- the trainer ---------------------------------------------------------
class Trainer:
    def __init__(self, task: TrainTask, cfg: TrainConfig, data_dir: Path, out: Path, resume: bool, events: Events):
        self.task, self.out, self.events = task, Path(out), events
        self.rank, self.world, self.device = _dist_setup()
        self.data = DataDir(data_dir)
        self.subword = self.data.subword()
        self.last_path = self.out / "checkpoints" / "last.pt"
        self.best_path = self.out / "checkpoints" / "best.pt"

        saved = self._resume_state(resume)
        self._session_start: float | None = None  # when run() began
        if saved is not None:  # the run's own settings and stopping rule, unless a new rule is given
            left = saved.get("minutes_left", saved["train_config"].get("minutes"))  # older checkpoints: all of it
            cfg = TrainConfig(**saved["train_config"]).resumed(cfg, left)
        self.cfg = cfg.validate()

        torch.manual_seed(cfg.seed)  # identical initial weights on every worker
        self.model_cfg = ModelConfig(
            vocab_size=len(self.subword),
            qkv_dim=task.space.qkv_dim,
            super_embed_dim=task.space.super_embed_dim,
            pad_idx=PAD,
            dropout=cfg.dropout,
            attention_dropout=cfg.attention_dropout,
        )
        self.model = self._build_model().to(self.device)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=cfg.weight_decay
        )
        self.arch_rng = np.random.default_rng(cfg.seed)
        self.cursor = BatchCursor()
        self.updates = 0
        self.best_valid: float | None = None
        if saved is not None:
            self._load_state(saved)
        self.ddp = (
            nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True) if self.world > 1 else None
        )
        self.train_split = self.data.split("train")
        self.valid_split = self.data.split("valid")
        if cfg.valid_subset:
            self.valid_split = self.valid_split.subset(cfg.valid_subset)
        self.src_lens, self.tgt_lens = self.train_split.lengths()

    # --- set-up helpers
    def _resume_state(self, resume: bool) -> dict[str, Any] | None:
        if not self.last_path.exists():
            if resume:
                self._log(f"nothing to resume in {self.out}; starting a new run")
            return None
        if not resume:
            raise HatcError(f"{self.last_path} exists; pass --resume to continue that run, or choose another --out")
        state = read_checkpoint(self.last_path, resumable=True)
        if state["kind"] != self.task.kind or space_of(state) != self.task.space:
            raise CheckpointError(
                f"{self.last_path} is a {state['kind']} of space '{state['space']['name']}'; "
                f"this run trains a {self.task.kind} of space '{self.task.space.name}'"
            )
        if self.task.kind == "subnet" and Architecture.from_dict(state["arch"]) != self.task.arch:
            raise CheckpointError(f"{self.last_path} trains a different architecture than --arch")
        if state["subword_model"] != self.subword.model_bytes:
            raise CheckpointError(f"{self.last_path} was trained with another vocabulary than {self.data.path}")
        return state

    def _build_model(self) -> nn.Module:
        task, cfg = self.task, self.model_cfg
        if task.kind == "supernet":
            return SuperTransformer.from_config(task.space, cfg)
        model = SubTransformer(task.arch, cfg)
        if task.inherit is not None:
            parent = read_checkpoint(task.inherit)
            if parent["kind"] != "supernet":
                raise CheckpointError(f"{task.inherit}: --inherit needs a supernet checkpoint, not a {parent['kind']}")
            if parent["subword_model"] != self.subword.model_bytes:
                raise CheckpointError(f"{task.inherit} was trained with another vocabulary than {self.data.path}")
            if space_of(parent) != task.space:
                raise CheckpointError(f"{task.inherit} is a supernet of another space than --space")
            supernet = SuperTransformer.from_config(task.space, model_config_of(parent))
            load_weights(supernet, parent["model"], task.inherit)
            supernet.set_active_subnet(task.arch)
            model.load_state_dict(supernet.get_active_subnet().state_dict())
        return model

    def _load_state(self, state: dict[str, Any]) -> None:
        load_weights(self.model, state["model"], self.last_path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.cursor = BatchCursor(**state["cursor"])
        self.arch_rng.bit_generator.state = state["arch_rng"]
        torch.set_rng_state(state["torch_rng"])
        self.updates = state["updates"]
        self.best_valid = state["best_valid"]
        cfg = self.cfg
        rule = [f"at update {cfg.max_updates}"] if cfg.max_updates is not None else []
        rule += [f"after {cfg.minutes:g} minutes"] if cfg.minutes is not None else []
        self._log(
            f"resumed {self.last_path} at update {self.updates} (epoch {self.cursor.epoch}); stopping "
            + " or ".join(rule)
        )
        if cfg.max_updates is not None and self.updates >= cfg.max_updates:
            self._log(f"the run has its {cfg.max_updates} updates already; give a larger --max-updates to train on")
        elif cfg.minutes == 0:
            self._log("the run's --minutes budget is spent; give --minutes M or --max-updates N to train on")

    def _log(self, message: str) -> None:
        if self.rank == 0:
            self.events("log", message)

    # --- the loop
    def epoch_share(self, epoch: int) -> list[np.ndarray]:
        batches = token_batches(self.src_lens, self.tgt_lens, self.cfg.max_tokens, self.cfg.seed, epoch)
        usable = len(batches) - len(batches) % self.world  # every worker gets the same number
        return batches[self.rank : usable : self.world]

    def run(self) -> TrainResult:
        cfg = self.cfg
        start = last_save = self._session_start = time.monotonic()
        if self.rank == 0:
            self.events("start", TrainStart(self.updates, cfg.max_updates, cfg.minutes))
        share = self.epoch_share(self.cursor.epoch)
        valid: dict[str, float] = {}
        stopped = "max_updates"
        update_log = self._update_log()
        with _StopOnSignal() as stop, update_log:
            while True:
                if self.cursor.index >= len(share):  # epoch done
                    if cfg.validate_every == 0:
                        valid = self.validate()
                    self.cursor = BatchCursor(self.cursor.epoch + 1, 0)
                    share = self.epoch_share(self.cursor.epoch)
                    continue
                reason = None
                if cfg.max_updates is not None and self.updates >= cfg.max_updates:
                    reason = "max_updates"
                elif cfg.minutes is not None and time.monotonic() - start >= cfg.minutes * 60:
                    reason = "minutes"
                elif stop.requested:
                    reason = "signal"
                arch = None
                if reason is None:  # sample only for an update that happens: resume must not skip a draw
                    arch = self.task.space.sample(self.arch_rng) if self.task.kind == "supernet" else self.task.arch
                reason, arch_dict = _broadcast((reason, arch and arch.to_dict()), self.world)
                if reason is not None:
                    stopped = reason
                    break
                arch = Architecture.from_dict(arch_dict)
                stats = self.step(arch, share, start)
                update_log.write(
                    json.dumps({"update": self.updates, "arch": arch_dict, "loss": stats.loss, "lr": stats.lr}) + "\n"
                )
                update_log.flush()
                if self.rank == 0:
                    self.events("update", stats)
                if cfg.validate_every and self.updates % cfg.validate_every == 0:
                    valid = self.validate()
                if self.updates % cfg.save_every == 0 or time.monotonic() - last_save >= cfg.save_minutes * 60:
                    self.save()
                    last_save = time.monotonic()
        if not valid and stopped != "signal":  # an interrupted user wants out quickly
            valid = self.validate()
        self.save()
        if stopped == "signal":
            raise Interrupted(f"interrupted at update {self.updates}; saved {self.last_path} (--resume continues)")
        return TrainResult(self.updates, stopped, valid, self.best_valid, self.last_path)

    def _update_log(self):
        path = self.out / "logs" / f"updates.rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8")

    def step(self, arch: Architecture, share: list[np.ndarray], start: float) -> UpdateStats:
        cfg, t0 = self.cfg, time.perf_counter()
        if isinstance(self.model, SuperTransformer):
            self.model.set_active_subnet(arch)
        self.model.train()
        micro = share[self.cursor.index : self.cursor.index + cfg.update_freq]
        self.cursor.index += len(micro)
        batches = [
            collate([self.train_split.src[i] for i in idx], [self.train_split.tgt[i] for i in idx]).to(self.device)
            for idx in micro
        ]
        ntokens = sum(b.ntokens for b in batches)
        forward = self.ddp or self.model
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = nll_sum = 0.0
        for i, batch in enumerate(batches):
            sync = self.ddp is None or i == len(batches) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync(), self._autocast():
                logits = forward(batch.src, batch.prev)
                loss, nll = label_smoothed_loss(logits, batch.target, cfg.label_smoothing)
            (loss / ntokens).backward()
            loss_sum, nll_sum = loss_sum + loss.item(), nll_sum + nll.item()
        if cfg.clip_norm > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
        lr = cfg.lr_at(self.updates + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.updates += 1
        elapsed = time.perf_counter() - t0
        return UpdateStats(
            update=self.updates,
            max_updates=cfg.max_updates,
            epoch=self.cursor.epoch,
            loss=loss_sum / ntokens,
            nll=nll_sum / ntokens,
            tokens_per_s=ntokens * self.world / max(elapsed, 1e-9),
            lr=lr,
            arch=arch,
            elapsed_s=time.monotonic() - start,
        )

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Per-token NLL on the validation split: the largest and smallest
        SubTransformer for a supernet, the model itself for a subnet."""
        if self.rank != 0:
            return {}
        space = self.task.space
        models = (
            {"largest": space.largest(), "smallest": space.smallest()}
            if self.task.kind == "supernet"
            else {"subnet": self.task.arch}
        )
        self.model.eval()
        losses = {
            name: validation_loss(self.model, arch, self.valid_split, self.cfg.max_tokens, self.device)
            for name, arch in models.items()
        }
        self.model.train()
        score = float(np.mean(list(losses.values())))
        record = {"update": self.updates, "epoch": self.cursor.epoch, **{f"{k}_loss": v for k, v in losses.items()}}
        with open(self.out / "logs" / "valid.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.events("valid", record)
        if self.best_valid is None or score < self.best_valid:
            self.best_valid = score
            save_checkpoint(self.state_dict(), self.best_path)
        return losses

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.task.kind,
            "space": self.task.space.to_dict(),
            "arch": self.task.arch.to_dict() if self.task.arch is not None else None,
            "model_config": asdict(self.model_cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"schedule": self.cfg.schedule, "updates": self.updates},
            "cursor": self.cursor.state_dict(),
            "arch_rng": self.arch_rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "updates": self.updates,
            "best_valid": self.best_valid,
            "train_config": asdict(self.cfg),
            "minutes_left": self._minutes_left(),
            "subword_model": self.subword.model_bytes,
            "data": {"dir": str(self.data.path.resolve()), "src": self.data.src, "tgt": self.data.tgt},
            "hatc_version": hatc.__version__,
        }

    def _minutes_left(self) -> float | None:
        """What a resume given no stopping rule may still train of this session's --minutes."""
        if self.cfg.minutes is None:
            return None
        elapsed = time.monotonic() - self._session_start if self._session_start is not None else 0.0
        return max(0.0, self.cfg.minutes - elapsed / 60)

    def save(self) -> None:
        if self.rank == 0:
            save_checkpoint(self.state_dict(), self.last_path)


def validation_loss(
    model: nn.Module, arch: Architecture, split: ParallelSplit, max_tokens: int, device: torch.device
) -> float:
    """Mean per-token NLL of ``arch`` (a supernet is switched to it) on ``split``."""
    if isinstance(model, SuperTransformer):
        model.set_active_subnet(arch)
    src_lens, tgt_lens = split.lengths()
    nll_sum, ntokens = 0.0, 0
    for idx in token_batches(src_lens, tgt_lens, max_tokens, seed=0, epoch=0):
        batch = collate([split.src[i] for i in idx], [split.tgt[i] for i in idx]).to(device)
        _, nll = label_smoothed_loss(model(batch.src, batch.prev), batch.target, 0.0)
        nll_sum, ntokens = nll_sum + nll.item(), ntokens + batch.ntokens
    return nll_sum / ntokens


def train(task: TrainTask, cfg: TrainConfig, data_dir: Path, out: Path, resume: bool, events: Events) -> TrainResult:
    """Trains ``task`` on ``data_dir`` into ``out``; see the module docstring."""
    trainer = Trainer(task, cfg, data_dir, out, resume, events)
    try:
        return trainer.run()
    finally:
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
