"""Decoding: beam 1 is greedy, incremental equals full recomputation, beam
search is independent of batching, and BLEU is sacreBLEU's own."""

import json

import numpy as np
import pytest
import sacrebleu
import torch

from hatc.data.subword import BOS, EOS
from hatc.decode import beam_search, greedy, pad_batch
from hatc.decoding import DecodeOptions
from hatc.space import load_space
from hatc.static.model import ModelConfig, SubTransformer

VOCAB = 60


@pytest.fixture(scope="module")
def model():
    space = load_space("tiny")
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=VOCAB, qkv_dim=space.qkv_dim, super_embed_dim=space.super_embed_dim)
    model = SubTransformer(space.sample(np.random.default_rng(2)), cfg).eval()
    with torch.no_grad():  # sharpen the output so decoding paths differ between sentences
        model.embed_tokens.weight.mul_(8)
    return model


def _sources(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(4, VOCAB, rng.integers(3, 12))) + [EOS] for _ in range(n)]


def test_beam_one_equals_greedy(model):
    src = pad_batch(_sources())
    options = DecodeOptions(beam=1)
    assert beam_search(model, src, options) == greedy(model, src, options)


def test_greedy_incremental_equals_full_recomputation(model):
    sources = _sources(4, seed=1)
    options = DecodeOptions(beam=1, max_len_a=0, max_len_b=12)
    fast = greedy(model, pad_batch(sources), options)
    for src, hyp in zip(sources, fast):
        prefix = [BOS]
        with torch.no_grad():
            while len(prefix) <= options.limit(len(src)):  # up to `limit` tokens, then EOS
                logits = model(torch.tensor([src]), torch.tensor([prefix]))[0, -1]
                logits[[0, BOS]] = float("-inf")
                token = int(logits.argmax())
                if token == EOS:
                    break
                prefix.append(token)
        assert hyp == prefix[1:]
    assert any(len(hyp) == options.limit(len(src)) for src, hyp in zip(sources, fast))  # the limit is reached


def test_beam_search_does_not_depend_on_batching(model):
    sources = _sources(5, seed=4)
    options = DecodeOptions(beam=4, lenpen=0.6)
    together = beam_search(model, pad_batch(sources), options)
    alone = [beam_search(model, pad_batch([s]), options)[0] for s in sources]
    assert together == alone
    assert len({tuple(h) for h in together}) > 1


def test_evaluate_bleu_is_sacrebleus_own(cli, tmp_path, shared_data):
    from hatc.data.datadir import prepare

    m30k = shared_data / "multi30k"
    data = tmp_path / "data"
    prepare({"train": str(m30k / "train"), "valid": str(m30k / "val")}, "en", "de", data, vocab_size=500, subset=100)
    run = tmp_path / "run"
    assert cli("train", "supernet", "--data", data, "--out", run, "--max-updates", "2", "--max-tokens", "800").code == 0
    ckpt = run / "checkpoints" / "last.pt"
    hyps = tmp_path / "hyps.txt"
    result = cli(
        "evaluate", "--checkpoint", ckpt, "--src", data / "valid.en", "--ref", data / "valid.de", "--beam", "2",
        "--output", hyps, "--json",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    outputs = hyps.read_text().splitlines()
    refs = (data / "valid.de").read_text().splitlines()
    assert len(outputs) == len(refs) == 100
    assert report["bleu"] == sacrebleu.corpus_bleu(outputs, [refs]).score
    assert report["chrf"] == sacrebleu.corpus_chrf(outputs, [refs]).score
    assert report["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    # translate prints the same output, one line per input line, on stdout only.
    translated = cli("translate", "--checkpoint", ckpt, "--input", data / "valid.en", "--beam", "2")
    assert translated.code == 0 and translated.stdout.splitlines() == outputs
    # Line counts must match; bad input is one line.
    short = tmp_path / "short.de"
    short.write_text("eins\n")
    bad = cli("evaluate", "--checkpoint", ckpt, "--src", data / "valid.en", "--ref", short)
    assert bad.code == 2 and "has 100 lines but" in bad.stderr
    neither = cli("evaluate", "--checkpoint", ckpt)
    assert neither.code == 2 and "--data" in neither.stderr
