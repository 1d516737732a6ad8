"""Binarized parallel data: ``hatc data prepare`` writes a data directory,
training and evaluation read it.

Layout of DATA_DIR (written to a temp dir, then renamed into place):
    meta.json           languages, vocabulary, per-split counts and sources
    subword.model       the joint sentencepiece model
    {split}.npz         src/tgt token ids (int32, concatenated) with offsets;
                        every sequence ends with EOS
    {split}.{lang}      the raw kept lines (references for evaluation)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import hatc
from hatc.data.corpus import read_parallel
from hatc.data.subword import EOS, SubwordModel
from hatc.errors import DataError

FORMAT = "hatc-data/1"
SPLITS = ("train", "valid", "test")


@dataclass
class SplitSummary:
    pairs: int
    skipped_empty: int
    skipped_long: int
    source: str


@dataclass
class ParallelSplit:
    """One split's token ids, each sequence ending with EOS."""

    src: list[np.ndarray]
    tgt: list[np.ndarray]
    src_text: list[str]
    tgt_text: list[str]

    def __len__(self) -> int:
        return len(self.src)

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array([len(s) for s in self.src]), np.array([len(t) for t in self.tgt])

    def subset(self, n: int) -> ParallelSplit:
        return ParallelSplit(self.src[:n], self.tgt[:n], self.src_text[:n], self.tgt_text[:n])


def prepare(
    prefixes: dict[str, str],
    src: str,
    tgt: str,
    out: Path,
    vocab_size: int = 8000,
    max_len: int = 256,
    subset: int | None = None,
    force: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """Reads the splits, learns the joint subword model on train, binarizes.

    Pairs empty on either side or longer than ``max_len`` subwords are skipped
    and counted. ``subset`` keeps the first N pairs of every split (for quick runs).
    Returns the metadata written to ``meta.json``.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise DataError(f"{out} exists and is not empty; choose another --out or pass --force")
    raw = {}
    for split, prefix in prefixes.items():
        src_lines, tgt_lines, src_path, tgt_path = read_parallel(prefix, src, tgt)
        if subset:
            src_lines, tgt_lines = src_lines[:subset], tgt_lines[:subset]
        raw[split] = (src_lines, tgt_lines, f"{src_path} | {tgt_path}")
        log(f"read {split}: {len(src_lines)} pairs from {prefix}.{{{src},{tgt}}}")

    train_src, train_tgt, _ = raw["train"]
    log(f"learning a joint subword model (vocab {vocab_size}) on {len(train_src)} train pairs")
    subword = SubwordModel.train((s for s in train_src + train_tgt if s.strip()), vocab_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a data dir is not
    try:
        (tmp / "subword.model").write_bytes(subword.model_bytes)
        summaries = {}
        for split, (src_lines, tgt_lines, source) in raw.items():
            summaries[split] = _binarize(subword, src_lines, tgt_lines, max_len, tmp, split, src, tgt, source)
            s = summaries[split]
            log(f"{split}: kept {s.pairs}, skipped {s.skipped_empty} empty and {s.skipped_long} longer than {max_len}")
        meta = {
            "format": FORMAT,
            "src": src,
            "tgt": tgt,
            "vocab_size": len(subword),
            "max_len": max_len,
            "splits": {k: vars(v) for k, v in summaries.items()},
            "hatc_version": hatc.__version__,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _binarize(
    subword: SubwordModel, src_lines, tgt_lines, max_len: int, out: Path, split: str, src: str, tgt: str, source: str
) -> SplitSummary:
    src_ids, tgt_ids = subword.encode_many(src_lines), subword.encode_many(tgt_lines)
    keep_src, keep_tgt, kept = [], [], []
    empty = long = 0
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        if not s or not t:
            empty += 1
        elif len(s) > max_len or len(t) > max_len:
            long += 1
        else:
            keep_src.append(s + [EOS])
            keep_tgt.append(t + [EOS])
            kept.append(i)
    if not kept:
        raise DataError(f"{split}: no pair is left after skipping empty and over-long ones ({source})")
    np.savez(out / f"{split}.npz", **_pack("src", keep_src), **_pack("tgt", keep_tgt))
    (out / f"{split}.{src}").write_text("".join(src_lines[i] + "\n" for i in kept), encoding="utf-8")
    (out / f"{split}.{tgt}").write_text("".join(tgt_lines[i] + "\n" for i in kept), encoding="utf-8")
    return SplitSummary(len(kept), empty, long, source)


def _pack(name: str, seqs: list[list[int]]) -> dict[str, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    tokens = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return {f"{name}_tokens": tokens, f"{name}_offsets": offsets}


def _unpack(data, name: str) -> list[np.ndarray]:
    tokens, offsets = data[f"{name}_tokens"].astype(np.int64), data[f"{name}_offsets"]
    return [tokens[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


class DataDir:
    """A prepared data directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.path}: not a hatc data directory (no meta.json); run 'hatc data prepare'")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise DataError(f"{meta_path}: not valid JSON") from None
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: unknown format {self.meta.get('format')!r}; expected {FORMAT}")
        self.src, self.tgt = self.meta["src"], self.meta["tgt"]

    def subword(self) -> SubwordModel:
        return SubwordModel.load(self.path / "subword.model")

    def split(self, name: str) -> ParallelSplit:
        path = self.path / f"{name}.npz"
        if not path.is_file():
            raise DataError(f"{self.path}: has no split '{name}' (splits: {', '.join(self.meta['splits'])})")
        with np.load(path) as data:
            src, tgt = _unpack(data, "src"), _unpack(data, "tgt")
        read = lambda lang: (self.path / f"{name}.{lang}").read_text(encoding="utf-8").splitlines()  # noqa: E731
        return ParallelSplit(src, tgt, read(self.src), read(self.tgt))
