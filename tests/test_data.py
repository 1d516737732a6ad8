"""Data preparation, the subword model and token batches on real Multi30k text."""

import gzip
import json
import unicodedata

import numpy as np
import pytest

from hatc.data.batching import collate, token_batches
from hatc.data.corpus import read_lines
from hatc.data.datadir import DataDir
from hatc.data.subword import BOS, EOS, PAD, SubwordModel


def _normalized(text: str) -> str:
    # The subword model's normalization (nmt_nfkc): NFKC, whitespace runs collapsed, ends stripped.
    return " ".join(unicodedata.normalize("NFKC", text).split())


def test_subword_round_trip_on_every_multi30k_train_line(shared_data):
    lines = []
    for lang in ("en", "de"):
        lines += read_lines(shared_data / "multi30k" / f"train.{lang}.gz")
    assert len(lines) == 58000
    model = SubwordModel.train(lines, vocab_size=8000)
    assert len(model) == 8000
    again = SubwordModel(model.model_bytes)  # survives serialization (as kept in checkpoints)
    mismatches = [x for x in lines if again.decode(again.encode(x)) != _normalized(x)]
    assert mismatches == []
    assert again.decode([BOS] + again.encode("Ein Hund läuft.") + [EOS, PAD]) == "Ein Hund läuft."


def test_subword_model_rejects_garbage():
    from hatc.errors import DataError

    with pytest.raises(DataError, match="corrupt"):
        SubwordModel(b"not a model")


def _corpus(tmp_path, name, src_lines, tgt_lines, gz=False):
    for lang, lines in (("en", src_lines), ("de", tgt_lines)):
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        path = tmp_path / (f"{name}.{lang}.gz" if gz else f"{name}.{lang}")
        path.write_bytes(gzip.compress(data) if gz else data)
    return str(tmp_path / name)


def test_prepare_skips_and_counts_empty_and_long_pairs(cli, shared_data, tmp_path):
    src = read_lines(shared_data / "multi30k" / "train.en.gz")[:300]
    tgt = read_lines(shared_data / "multi30k" / "train.de.gz")[:300]
    src[5], tgt[7] = "", "   "
    src[9] = " ".join(["word"] * 400)
    prefix = _corpus(tmp_path, "train", src, tgt, gz=True)
    valid = str(shared_data / "multi30k" / "val")
    out = tmp_path / "data"
    result = cli(
        "data", "prepare", "--train", prefix, "--valid", valid, "--out", out, "--vocab-size", "500",
        "--max-len", "150", "--json",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    meta = json.loads(result.stdout)
    assert meta["splits"]["train"] == {**meta["splits"]["train"], "pairs": 297, "skipped_empty": 2, "skipped_long": 1}
    data = DataDir(out)
    train = data.split("train")
    assert len(train) == 297 and len(train.src_text) == 297
    assert all(seq[-1] == EOS and len(seq) <= 151 for seq in train.src + train.tgt)
    assert data.subword().decode(train.tgt[0]) == _normalized(tgt[0])
    # An existing data dir is not overwritten by accident.
    again = cli("data", "prepare", "--train", prefix, "--valid", valid, "--out", out, "--vocab-size", "500")
    assert again.code == 2 and "--force" in again.stderr


@pytest.mark.parametrize(
    "case, expected",
    [
        ("mismatch", "has 3 lines but"),
        ("empty", "file is empty"),
        ("utf8", "line 2 is not valid UTF-8"),
        ("missing", "no file"),
    ],
)
def test_prepare_bad_input_is_one_clear_line(cli, tmp_path, case, expected):
    good = ["a dog runs", "a cat sleeps", "two birds"]
    if case == "mismatch":
        prefix = _corpus(tmp_path, "t", good, good[:2])
    elif case == "empty":
        prefix = _corpus(tmp_path, "t", [], [])
    elif case == "utf8":
        prefix = _corpus(tmp_path, "t", good, good)
        (tmp_path / "t.de").write_bytes(b"ok\n\xff\xfe bad\nok\n")
    else:
        prefix = str(tmp_path / "nothing")
    result = cli("data", "prepare", "--train", prefix, "--valid", prefix, "--out", tmp_path / "out")
    assert result.code == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_data_dir(cli, tmp_path):
    result = cli("train", "supernet", "--data", tmp_path / "none", "--out", tmp_path / "run", "--max-updates", "1")
    assert result.code == 2 and "not a hatc data directory" in result.stderr


def test_token_batches_cover_every_pair_once_within_budget():
    rng = np.random.default_rng(0)
    src_lens, tgt_lens = rng.integers(3, 40, 1000), rng.integers(3, 40, 1000)
    batches = token_batches(src_lens, tgt_lens, max_tokens=256, seed=1, epoch=1)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    for b in batches:
        assert len(b) * max(max(src_lens[b]), max(tgt_lens[b])) <= 256
    assert all(np.array_equal(x, y) for x, y in zip(batches, token_batches(src_lens, tgt_lens, 256, 1, 1)))
    assert not all(
        np.array_equal(x, y) for x, y in zip(batches, token_batches(src_lens, tgt_lens, 256, 1, 2))
    )  # a new epoch reshuffles


def test_collate_shifts_target_right_with_bos():
    batch = collate(
        [np.array([5, 6, EOS])],
        [
            np.array([7, 8, 9, EOS]),
        ][:1],
    )
    assert batch.prev.tolist() == [[BOS, 7, 8, 9]]
    assert batch.target.tolist() == [[7, 8, 9, EOS]]
    assert batch.ntokens == 4


def test_download_offline_fails_with_one_line(cli, tmp_path, monkeypatch):
    from hatc.data import download

    monkeypatch.setitem(download.CORPORA, "multi30k", ("http://127.0.0.1:9/", download.MULTI30K_FILES))
    result = cli("data", "download", "multi30k", "--out", tmp_path / "m30k")
    assert result.code == 2
    assert "cannot download http://127.0.0.1:9/train.en.gz" in result.stderr and "Traceback" not in result.stderr
    assert list((tmp_path / "m30k").iterdir()) == []  # nothing half-written
    unknown = cli("data", "download", "wmt99", "--out", tmp_path / "x")
    assert unknown.code == 2 and "known: multi30k" in unknown.stderr
