"""The BLEU check of ``hatc compile --data/--src``: does this build translate as well as fp32?

Both the fp32 SubTransformer (PyTorch) and the build (this host's libraries, through
the torch-free runtime's beam search, as ``hatc translate --artifact`` runs them)
translate the same sentences with the artifact's decoding rules; sacreBLEU scores
both against the references. The loss (fp32 BLEU - build BLEU) above
``max_loss`` refuses the artifact (exit 2, nothing written) unless ``allow_loss``.
The manifest records both scores, the loss with its paired-bootstrap interval, and
how often the two agree token for token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatc.data.subword import EOS
from hatc.decoding import DecodeOptions
from hatc.errors import DataError, HatcError
from hatc.evaluate import paired_bootstrap
from hatc.runtime.beam import decode
from hatc.runtime.runners import Decoding, GraphRunner
from hatc.runtime.signature import bucket_for

DEFAULT_SENTENCES = 500
DEFAULT_MAX_LOSS = 0.5


class QualityError(HatcError):
    """The build loses more BLEU than allowed; nothing is written."""


@dataclass(frozen=True)
class QualityRequest:
    sources: tuple[str, ...]
    references: tuple[str, ...]
    where: str  # where the sentences came from, for the manifest and messages
    max_loss: float = DEFAULT_MAX_LOSS
    allow_loss: bool = False  # write the artifact anyway, with a warning


def quality_request(
    data: Path | None,
    src: Path | None,
    ref: Path | None,
    sentences: int = DEFAULT_SENTENCES,
    max_loss: float = DEFAULT_MAX_LOSS,
    allow_loss: bool = False,
) -> QualityRequest | None:
    """The first ``sentences`` pairs of ``data``'s validation split (or of ``src``/``ref``); None without either."""
    from hatc.data.corpus import read_lines
    from hatc.data.datadir import DataDir

    if data is None and src is None and ref is None:
        return None
    if (data is None) == (src is None) or (src is None) != (ref is None):
        raise HatcError("the BLEU check takes either --data DATA_DIR or both --src FILE and --ref FILE")
    if sentences < 1:
        raise HatcError(f"--check-sentences must be >= 1, got {sentences}")
    if max_loss < 0:
        raise HatcError(f"--max-bleu-loss must be >= 0, got {max_loss}")
    if data is not None:
        data_dir = DataDir(data)
        if "valid" not in data_dir.meta["splits"]:
            raise DataError(f"{data}: has no validation split 'valid' (splits: {', '.join(data_dir.meta['splits'])})")
        sources = read_lines(data_dir.path / f"valid.{data_dir.src}")
        references = read_lines(data_dir.path / f"valid.{data_dir.tgt}")
        where = f"{data} (valid)"
    else:
        sources, references = read_lines(src), read_lines(ref)
        if len(sources) != len(references):
            raise DataError(f"{src} has {len(sources)} lines but {ref} has {len(references)}")
        where = f"{src} / {ref}"
    if not sources:
        raise DataError(f"{where}: no sentences to check")
    n = min(sentences, len(sources))
    return QualityRequest(tuple(sources[:n]), tuple(references[:n]), where, max_loss, allow_loss)


def token_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Share of token positions where two systems' outputs agree (over the longer of each pair)."""
    same = sum(sum(x == y for x, y in zip(s, t)) for s, t in zip(a, b))
    total = sum(max(len(s), len(t)) for s, t in zip(a, b))
    return same / total if total else 1.0


def check_quality(
    request: QualityRequest, loaded: Any, runners: Mapping[int, GraphRunner], options: DecodeOptions
) -> dict[str, Any]:
    """Scores fp32 (PyTorch) and the build on ``request``'s sentences; the manifest's ``quality``.

    Raises:
        QualityError: the BLEU loss is above ``request.max_loss`` and not allowed.
    """
    from hatc.decode import translate_ids
    from hatc.evaluate import score

    buckets = tuple(sorted(runners))
    encoded = [loaded.subword.encode(line) + [EOS] for line in request.sources]
    kept = [i for i, ids in enumerate(encoded) if len(ids) <= buckets[-1]]
    if not kept:
        raise DataError(f"{request.where}: no sentence fits the largest bucket ({buckets[-1]} subwords)")
    references = [request.references[i] for i in kept]
    fp32_ids = translate_ids(loaded.model, [encoded[i] for i in kept], options)
    build_ids = [decode(Decoding(runners[bucket_for(len(encoded[i]), buckets)]), encoded[i], options) for i in kept]
    fp32 = [loaded.subword.decode(ids) for ids in fp32_ids]
    build = [loaded.subword.decode(ids) for ids in build_ids]
    fp32_bleu, build_bleu = score(fp32, references)["bleu"], score(build, references)["bleu"]
    paired = paired_bootstrap(fp32, build, references)
    loss = fp32_bleu - build_bleu
    result: dict[str, Any] = {
        "sentences": len(kept),
        "skipped_longer_than_bucket": len(encoded) - len(kept),
        "source": request.where,
        "beam": options.beam,
        "bleu_fp32": round(fp32_bleu, 3),
        "bleu": round(build_bleu, 3),
        "bleu_loss": round(loss, 3),
        "bleu_delta_ci95": [round(x, 3) for x in paired["ci95"]],
        "identical_share": round(sum(a == b for a, b in zip(fp32_ids, build_ids)) / len(kept), 4),
        "token_agreement": round(token_agreement(fp32_ids, build_ids), 4),
        "max_bleu_loss": request.max_loss,
        "allowed": False,
    }
    if loss > request.max_loss:
        line = (
            f"this build loses {loss:.2f} BLEU against fp32 ({build_bleu:.2f} vs {fp32_bleu:.2f} on {len(kept)} "
            f"sentences of {request.where}), above --max-bleu-loss {request.max_loss:g}"
        )
        if not request.allow_loss:
            raise QualityError(f"{line}; artifact not written (--allow-bleu-loss writes it anyway)")
        result["allowed"] = True
        result["warning"] = f"{line}; written anyway (--allow-bleu-loss)"
    return result
