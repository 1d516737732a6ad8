"""The search's fitness: batches built once, the loss the supernet's own, the same in any process."""

import numpy as np
import pytest
import torch

from hatc.data.batching import collate, token_batches
from hatc.data.datadir import ParallelSplit
from hatc.data.subword import EOS
from hatc.elastic.supernet import SuperTransformer
from hatc.search.fitness import LossEngine, SupernetValidLoss, one_thread, scoring_batches, valid_loss
from hatc.space import load_space
from hatc.train.loop import label_smoothed_loss

VOCAB = 300


@pytest.fixture(scope="module")
def supernet():
    torch.manual_seed(0)
    return SuperTransformer(load_space("tiny"), VOCAB).eval()


@pytest.fixture(scope="module")
def split():
    rng = np.random.default_rng(0)

    def sentence():
        return np.append(rng.integers(4, VOCAB, int(rng.integers(2, 40))), EOS).astype(np.int64)

    pairs = [(sentence(), sentence()) for _ in range(70)]
    return ParallelSplit([s for s, _ in pairs], [t for _, t in pairs], [""] * 70, [""] * 70)


def _archs(space, n=4):
    rng = np.random.default_rng(1)
    return [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(n))]


def test_batches_hold_every_pair_once_within_the_token_limit(split):
    batches = scoring_batches(split, max_tokens=256)
    assert sum(b.src.shape[0] for b in batches) == len(split)
    assert sum(b.ntokens for b in batches) == sum(len(t) for t in split.tgt)
    for b in batches:
        assert b.src.shape[0] == 1 or b.src.shape[0] * max(b.src.shape[1], b.prev.shape[1]) <= 256
        assert b.target.numel() == b.ntokens == int(b.keep.sum())
    assert scoring_batches(split, 256)[3].src.equal(batches[3].src)  # no randomness


def test_the_loss_is_the_supernets_teacher_forced_nll(supernet, split):
    """What the scorer computes (sorted batches, projection of real tokens only, logsumexp) is
    the per-token NLL of the supernet's own forward on the training loop's batches."""
    src_lens, tgt_lens = split.lengths()
    reference_batches = [
        collate([split.src[i] for i in idx], [split.tgt[i] for i in idx])
        for idx in token_batches(src_lens, tgt_lens, 4096, seed=0, epoch=0)
    ]
    batches = scoring_batches(split)
    for arch in _archs(supernet.space, 1):
        supernet.set_active_subnet(arch)
        with torch.no_grad(), one_thread():  # small ops: threads of a busy machine would wait for each other
            nll = sum(label_smoothed_loss(supernet(b.src, b.prev), b.target, 0.0)[1].item() for b in reference_batches)
        expected = nll / sum(b.ntokens for b in reference_batches)
        assert valid_loss(supernet, arch, batches) == pytest.approx(expected, rel=1e-6)


def test_worker_processes_compute_the_same_losses_as_this_process(supernet, split):
    archs = _archs(supernet.space)
    with (
        LossEngine(supernet, split, [30, 70], workers=1) as here,
        LossEngine(supernet, split, [30, 70], workers=2) as pool,
    ):
        for n in (30, 70):
            local, remote = SupernetValidLoss(here, n), SupernetValidLoss(pool, n)
            assert local.score_many(archs) == remote.score_many(archs)  # exactly: one thread each
    assert here.size(500) == 70  # a split shorter than asked is scored whole


def test_each_architecture_is_scored_once(supernet, split):
    space = supernet.space
    a, b = _archs(space, 0)
    calls = []
    with LossEngine(supernet, split, [20]) as engine:
        scorer = SupernetValidLoss(engine, 20)
        first = scorer.score_many([a, b, a, a], on_scored=lambda *args: calls.append(args[2:]))
        assert calls == [(1, 2), (2, 2)] and first[0] == first[2] == first[3]
        assert scorer.score_many([b, a], on_scored=lambda *args: calls.append(args)) == [first[1], first[0]]
    assert len(calls) == 2  # nothing computed again
