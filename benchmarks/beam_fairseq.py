"""BLEU of hatc's beam search before and after it followed fairseq's rule.

Until issue 14, beam search also finished a hypothesis on an EOS ranked below
the top ``beam`` candidates of a step (while fewer than ``beam`` non-EOS
candidates had been kept), and stopped one token short of fairseq's maximum
length. fairseq, whose numbers HAT reports, finishes only EOS among the top
``beam`` candidates and forces EOS at step ``max_len``. This script decodes a
split of a prepared data directory with both rules (the old one lives only
here, copied from hatc/decode.py as it was), scores both with sacreBLEU, runs
sacreBLEU's paired bootstrap resampling, and writes a table and a JSON:

    nice python benchmarks/beam_fairseq.py --checkpoint runs/beam-fairseq/subnet/checkpoints/best.pt \\
        --data runs/beam-fairseq/data --out benchmarks/results/beam_fairseq.json

The CI of the difference comes from the same resamples as sacreBLEU's test
(its seed, ``SACREBLEU_SEED`` or 12345, and its index draw).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import sacrebleu
import torch

import hatc
from hatc import atomic
from hatc.checkpoint import load_subtransformer
from hatc.data.corpus import read_lines
from hatc.data.datadir import DataDir
from hatc.data.subword import BOS, EOS, PAD
from hatc.decode import beam_search, pad_batch
from hatc.decoding import DEFAULT_BEAM, DEFAULT_LENPEN, DecodeOptions
from hatc.evaluate import paired_bootstrap
from hatc.evaluate import score as score_corpus
from hatc.static.model import SubTransformer

# ---------------------------------------------------------------- the old rule (hatc before issue 14)


def _old_limits(src: torch.Tensor, options: DecodeOptions) -> torch.Tensor:
    return torch.tensor([options.limit(int(n)) for n in src.ne(PAD).sum(dim=1)])


def _old_step_logprobs(model: SubTransformer, tokens: torch.Tensor, cache, step: int, limits: torch.Tensor):
    logits, cache = model.decode_step(tokens, cache)
    lprobs = torch.nn.functional.log_softmax(logits.float(), dim=-1)
    lprobs[:, PAD] = lprobs[:, BOS] = float("-inf")
    full = step + 1 >= limits  # the old limit: EOS forced one step before fairseq's
    if full.any():
        eos = lprobs[full, EOS]
        lprobs[full] = float("-inf")
        lprobs[full, EOS] = eos
    return lprobs, cache


@torch.no_grad()
def old_beam_search(model: SubTransformer, src: torch.Tensor, options: DecodeOptions) -> list[list[int]]:
    """hatc.decode.beam_search before issue 14, verbatim."""
    batch, k = src.shape[0], options.beam
    limits = _old_limits(src, options).repeat_interleave(k)
    enc = model.encode(src)
    cache = model.start_decoding(enc.index_select(torch.arange(batch).repeat_interleave(k)))
    tokens = torch.full((batch * k, 1), BOS, dtype=torch.long)
    history = torch.zeros(batch * k, 0, dtype=torch.long)
    scores = torch.zeros(batch, k)
    scores[:, 1:] = float("-inf")
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    for step in range(int(limits.max())):
        lprobs, cache = _old_step_logprobs(model, tokens, cache, step, limits)
        vocab = lprobs.shape[-1]
        candidates = (scores.unsqueeze(-1) + lprobs.view(batch, k, vocab)).view(batch, k * vocab)
        top_scores, top_ids = candidates.topk(2 * k, dim=-1)
        new_scores = torch.full((batch, k), float("-inf"))
        origin = torch.zeros(batch, k, dtype=torch.long)
        new_tokens = torch.full((batch, k), PAD, dtype=torch.long)
        for b in range(batch):
            if len(finished[b]) >= k:
                origin[b] = b * k
                continue
            kept = 0
            for score, flat in zip(top_scores[b].tolist(), top_ids[b].tolist()):
                if score == float("-inf"):
                    break
                beam, token = divmod(flat, vocab)
                if token == EOS:  # finishes at any rank while fewer than k non-EOS were kept
                    if len(finished[b]) < k:
                        hyp = history[b * k + beam].tolist()
                        finished[b].append((score / (len(hyp) + 1) ** options.lenpen, hyp))
                    continue
                new_scores[b, kept], origin[b, kept], new_tokens[b, kept] = score, b * k + beam, token
                kept += 1
                if kept == k:
                    break
        if all(len(f) >= k for f in finished):
            break
        order = origin.view(-1)
        cache = cache.index_select(order)
        history = torch.cat([history.index_select(0, order), new_tokens.view(-1, 1)], dim=1)
        tokens, scores = new_tokens.view(-1, 1), new_scores
    return [max(f, key=lambda pair: pair[0])[1] if f else [] for f in finished]


# ---------------------------------------------------------------- decoding and scoring


Search = Callable[[SubTransformer, torch.Tensor, DecodeOptions], list[list[int]]]


def translate(
    loaded, lines: list[str], options: DecodeOptions, search: Search, batch_sentences: int
) -> tuple[list[str], list[bool]]:
    """hatc.decode.translate_lines with the beam search given (same batches by
    length): the translations, and whether each used every token its length
    limit allowed (old: limit - 1 before the EOS, capped by the model's
    positions; new: limit, capped by the positions - 1)."""
    model, subword = loaded.model.eval(), loaded.subword
    old = search is old_beam_search
    encoded = [subword.encode(line) + [EOS] for line in lines]
    options = replace(options, max_len=min(options.max_len, model.cfg.max_positions - (0 if old else 1)))
    order = sorted(range(len(lines)), key=lambda i: len(encoded[i]))
    results, at_limit = [""] * len(lines), [False] * len(lines)
    for start in range(0, len(order), batch_sentences):
        chunk = order[start : start + batch_sentences]
        for i, hyp in zip(chunk, search(model, pad_batch([encoded[i] for i in chunk]), options)):
            results[i] = subword.decode(hyp)
            at_limit[i] = len(hyp) == options.limit(len(encoded[i])) - (1 if old else 0)
    return results, at_limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="Subnet or supernet checkpoint.")
    parser.add_argument("--arch", default=None, help="A supernet's SubTransformer (default: largest).")
    parser.add_argument("--data", required=True, help="Data directory from 'hatc data prepare'.")
    parser.add_argument("--split", default="test")
    parser.add_argument("--beam", type=int, default=DEFAULT_BEAM)
    parser.add_argument("--lenpen", type=float, default=DEFAULT_LENPEN)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--batch-sentences", type=int, default=32)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--examples", type=int, default=5, help="Changed sentences to show in the JSON.")
    parser.add_argument("--out", default="benchmarks/results/beam_fairseq.json")
    args = parser.parse_args()

    data = DataDir(args.data)
    sources = read_lines(data.path / f"{args.split}.{data.src}")
    references = read_lines(data.path / f"{args.split}.{data.tgt}")
    loaded = load_subtransformer(args.checkpoint, args.arch)
    options = DecodeOptions(beam=args.beam, lenpen=args.lenpen, max_len=args.max_len)
    outputs, at_limit, seconds = {}, {}, {}
    for name, search in (("old", old_beam_search), ("new", beam_search)):
        start, cpu = time.perf_counter(), time.process_time()
        outputs[name], at_limit[name] = translate(loaded, sources, options, search, args.batch_sentences)
        seconds[name] = {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}
        print(f"{name}: decoded {len(sources)} sentences in {seconds[name]['wall']:.0f} s", file=sys.stderr)
    scores = {name: score_corpus(hyps, references) for name, hyps in outputs.items()}
    changed = [i for i, (a, b) in enumerate(zip(outputs["old"], outputs["new"])) if a != b]
    longer = sum(len(outputs["new"][i].split()) > len(outputs["old"][i].split()) for i in changed)
    bootstrap = paired_bootstrap(outputs["old"], outputs["new"], references, samples=args.resamples)
    result = {
        "benchmark": "beam_fairseq",
        "checkpoint": {
            "path": str(args.checkpoint),
            "kind": loaded.state["kind"],
            "updates": loaded.state.get("updates"),
            "best_valid": loaded.state.get("best_valid"),
            "train_config": loaded.state.get("train_config"),
        },
        "arch": loaded.arch.to_dict(),
        "data": str(args.data),
        "split": args.split,
        "sentences": len(sources),
        "settings": {**asdict(options), "batch_sentences": args.batch_sentences, "resamples": args.resamples},
        "versions": {
            "hatc": hatc.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "sacrebleu": sacrebleu.__version__,
            "python": platform.python_version(),
        },
        "bleu": {
            "old": scores["old"]["bleu"],
            "new": scores["new"]["bleu"],
            "delta": scores["new"]["bleu"] - scores["old"]["bleu"],
        },
        "chrf": {"old": scores["old"]["chrf"], "new": scores["new"]["chrf"]},
        "signature": scores["new"]["signature"],
        "bootstrap": bootstrap,
        "at_length_limit": {name: sum(flags) for name, flags in at_limit.items()},
        "changed": {
            "sentences": len(changed),
            "longer_in_words": longer,
            # changed where both rules ran into their length limits (the new one allows one more token)
            "both_at_length_limit": sum(at_limit["old"][i] and at_limit["new"][i] for i in changed),
            "examples": [
                {
                    "line": i + 1,
                    "source": sources[i],
                    "old": outputs["old"][i],
                    "new": outputs["new"][i],
                    "reference": references[i],
                }
                for i in changed[: args.examples]
            ],
        },
        "decode_seconds": seconds,  # on a shared machine: compare the CPU seconds
        "threads": torch.get_num_threads(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    low, high = bootstrap["ci95"]
    print(f"{'rule':<34} {'BLEU':>7} {'chrF':>7}")
    print(f"{'old (EOS at any rank < 2k)':<34} {scores['old']['bleu']:7.2f} {scores['old']['chrf']:7.2f}")
    print(f"{'new (fairseq: EOS in the top k)':<34} {scores['new']['bleu']:7.2f} {scores['new']['chrf']:7.2f}")
    print(
        f"delta {result['bleu']['delta']:+.3f} BLEU, 95% CI [{low:+.3f}, {high:+.3f}] "
        f"(paired bootstrap, {args.resamples} resamples), p = {bootstrap['p_value']:.4f}; "
        f"{len(changed)} of {len(sources)} sentences changed "
        f"({result['changed']['both_at_length_limit']} where both ran into their length limits); wrote {out}"
    )


if __name__ == "__main__":
    main()
