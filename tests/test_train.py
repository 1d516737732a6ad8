"""Training: resumable to the exact weights, interruptible, distributed, and
every checkpoint usable on its own."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hatc.checkpoint import load_subtransformer, read_checkpoint
from hatc.space import load_space

TRAIN = ["--max-tokens", "600", "--warmup", "4", "--save-every", "2", "--lr", "2e-3"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, shared_data):
    from hatc.data.datadir import prepare

    out = tmp_path_factory.mktemp("data") / "m30k"
    m30k = shared_data / "multi30k"
    prefixes = {"train": m30k / "train", "valid": m30k / "val", "test": m30k / "test_2016_flickr"}
    prepare({k: str(v) for k, v in prefixes.items()}, "en", "de", out, vocab_size=600, subset=150)
    return out


def _updates_log(run, rank=0):
    return [json.loads(line) for line in (run / "logs" / f"updates.rank{rank}.jsonl").read_text().splitlines()]


def test_resume_gives_the_same_weights_as_one_run(cli, data_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # 150 pairs make 10 batches an epoch: 13 updates cross an epoch boundary, the stop at 4 does not.
    assert cli("train", "supernet", "--data", data_dir, "--out", straight, "--max-updates", "13", *TRAIN).code == 0
    first = cli("train", "supernet", "--data", data_dir, "--out", split, "--max-updates", "4", *TRAIN, "--json")
    assert first.code == 0 and json.loads(first.stdout)["updates"] == 4
    again = cli("train", "supernet", "--data", data_dir, "--out", split, "--max-updates", "4", *TRAIN)
    assert again.code == 2 and "--resume" in again.stderr  # never overwrites a run by accident
    second = cli(
        "train", "supernet", "--data", data_dir, "--out", split, "--max-updates", "13", "--resume", *TRAIN, "--json"
    )
    assert second.code == 0 and json.loads(second.stdout)["updates"] == 13
    a, b = read_checkpoint(straight / "checkpoints" / "last.pt"), read_checkpoint(split / "checkpoints" / "last.pt")
    assert a["cursor"]["epoch"] >= 2
    assert [r["loss"] for r in _updates_log(straight)] == [r["loss"] for r in _updates_log(split)]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert len({json.dumps(r["arch"]) for r in _updates_log(straight)}) > 1  # one subnet sampled per update


def test_checkpoint_is_self_contained(cli, data_dir, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "supernet", "--data", data_dir, "--out", run, "--max-updates", "2", *TRAIN).code == 0
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "cursor", "arch_rng", "torch_rng", "space", "subword_model"):
        assert key in state
    assert (run / "checkpoints" / "best.pt").exists()
    # Later commands need only the checkpoint: the data dir may be gone.
    loaded = load_subtransformer(run / "checkpoints" / "last.pt", "smallest")
    assert loaded.arch == load_space("tiny").smallest()
    assert loaded.subword.model_bytes == (data_dir / "subword.model").read_bytes()


def test_subnet_inherit_and_scratch(cli, data_dir, tmp_path):
    supernet = tmp_path / "super"
    assert cli("train", "supernet", "--data", data_dir, "--out", supernet, "--max-updates", "2", *TRAIN).code == 0
    ckpt = supernet / "checkpoints" / "last.pt"
    arch = load_space("tiny").sample(__import__("numpy").random.default_rng(5))
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps({"space": "tiny", **arch.to_dict()}))

    inherited = load_subtransformer(ckpt, str(arch_file)).model
    sub = tmp_path / "sub"
    args = ["--data", data_dir, "--out", sub, "--arch", arch_file, "--max-updates", "1", *TRAIN]
    assert cli("train", "subnet", *args, "--inherit", ckpt, "--lr", "0").code == 0  # lr 0: weights stay inherited
    trained = load_subtransformer(sub / "checkpoints" / "last.pt")
    assert trained.kind == "subnet" and trained.arch == arch
    for name, tensor in inherited.state_dict().items():
        assert torch.equal(tensor, trained.model.state_dict()[name]), name

    other = cli("translate", "--checkpoint", sub / "checkpoints" / "last.pt", "--arch", "largest", stdin="A dog.\n")
    assert other.code == 2 and "different" in other.stderr
    scratch = cli("train", "subnet", *args[: -len(TRAIN) - 2], "--from-scratch", "--max-updates", "1", *TRAIN)
    assert scratch.code == 2  # same --out already holds the inherited run
    assert cli("train", "subnet", "--data", data_dir, "--out", tmp_path / "s2", "--arch", arch_file,
               "--from-scratch", "--max-updates", "1", *TRAIN).code == 0  # fmt: skip
    neither = cli("train", "subnet", "--data", data_dir, "--out", tmp_path / "s3", "--arch", "smallest",
                  "--space", "tiny", "--max-updates", "1")  # fmt: skip
    assert neither.code == 2 and "--from-scratch or --inherit" in neither.stderr


def test_bad_checkpoints_are_refused(cli, data_dir, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 100)
    result = cli("translate", "--checkpoint", corrupt, stdin="A dog.\n")
    assert result.code == 2 and "corrupt.pt" in result.stderr and "Traceback" not in result.stderr
    missing = cli("evaluate", "--checkpoint", tmp_path / "none.pt", "--data", data_dir)
    assert missing.code == 2 and "no such checkpoint" in missing.stderr
    # Resuming a run on data with another vocabulary.
    run = tmp_path / "run"
    assert cli("train", "supernet", "--data", data_dir, "--out", run, "--max-updates", "1", *TRAIN).code == 0
    from hatc.data.datadir import prepare

    other = tmp_path / "other"
    prepare({"train": str(data_dir / "train"), "valid": str(data_dir / "valid")}, "en", "de", other, vocab_size=400)
    result = cli("train", "supernet", "--data", other, "--out", run, "--max-updates", "2", "--resume", *TRAIN)
    assert result.code == 2 and "another vocabulary" in result.stderr


def _hatc(*args):
    return [sys.executable, "-m", "hatc", *map(str, args)]


def test_interrupt_saves_a_resumable_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    cmd = _hatc("train", "supernet", "--data", data_dir, "--out", run, "--max-updates", "10000", *TRAIN)
    cmd[cmd.index("--save-every") + 1] = "100000"  # only the interrupt saves
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "logs" / "updates.rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at update" in err and "Traceback" not in err
    state = read_checkpoint(run / "checkpoints" / "last.pt")
    assert state["updates"] >= 3
    assert not list((run / "checkpoints").glob(".*tmp"))
    done = subprocess.run(
        _hatc("train", "supernet", "--data", data_dir, "--out", run, "--max-updates", state["updates"] + 1,
              "--resume", *TRAIN, "--json"),  # fmt: skip
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["updates"] == state["updates"] + 1


def test_ddp_two_gloo_workers_sample_the_same_subnets(data_dir, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
        "-m", "hatc", "train", "supernet", "--data", str(data_dir), "--out", str(run), "--max-updates", "4", *TRAIN,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rank0, rank1 = _updates_log(run, 0), _updates_log(run, 1)
    assert len(rank0) == len(rank1) == 4
    assert [r["arch"] for r in rank0] == [r["arch"] for r in rank1]
    assert rank0[0]["loss"] != rank1[0]["loss"]  # each worker saw its own share of the data
    assert read_checkpoint(run / "checkpoints" / "last.pt")["updates"] == 4


# ----- resume: the run's own stopping rule (issue 17) -------------------------------------------
def test_a_resume_keeps_the_runs_stopping_rule_unless_given_one():
    from hatc.train.config import TrainConfig

    saved = TrainConfig(max_updates=100, minutes=60, lr=5e-4)
    rule = lambda c: (c.max_updates, c.minutes, c.lr)  # noqa: E731
    assert rule(saved.resumed(TrainConfig(), 12.5)) == (100, 12.5, 5e-4)  # the rest of its budget
    assert rule(saved.resumed(TrainConfig(minutes=5), 12.5)) == (100, 5, 5e-4)  # this time; the total stays
    assert rule(saved.resumed(TrainConfig(max_updates=200), 12.5)) == (200, None, 5e-4)  # a new total
    assert rule(TrainConfig(minutes=60).resumed(TrainConfig(), None)) == (None, None, 1e-3)


def _edit_last(run, **changes):
    path = run / "checkpoints" / "last.pt"
    state = read_checkpoint(path, resumable=True)
    state["train_config"] |= {k: v for k, v in changes.items() if k != "minutes_left"}
    if "minutes_left" in changes:
        state["minutes_left"] = changes["minutes_left"]
    torch.save(state, path)


def test_resume_alone_continues_with_the_runs_own_stopping_rule(cli, data_dir, tmp_path):
    run = tmp_path / "run"
    unruled = cli("train", "supernet", "--data", data_dir, "--out", run, *TRAIN)
    assert unruled.code == 2 and "--max-updates" in unruled.stderr
    assert len(unruled.stderr.strip().splitlines()) == 1, unruled.stderr  # no progress bar before the refusal
    assert cli("train", "supernet", "--data", data_dir, "--out", run, "--max-updates", "2", *TRAIN).code == 0
    _edit_last(run, max_updates=5, minutes=60, minutes_left=30.0)  # as if stopped at 2 of 5, 30 of 60 min left

    resumed = cli("train", "supernet", "--data", data_dir, "--out", run, "--resume", "--json")
    assert resumed.code == 0, resumed.stderr
    assert (json.loads(resumed.stdout)["updates"], json.loads(resumed.stdout)["stopped"]) == (5, "max_updates")
    assert "stopping at update 5 or after 30 minutes" in resumed.stderr, resumed.stderr
    state = read_checkpoint(run / "checkpoints" / "last.pt", resumable=True)
    assert state["train_config"]["max_updates"] == 5 and 0 < state["minutes_left"] < 30

    done = cli("train", "supernet", "--data", data_dir, "--out", run, "--resume", "--json")
    assert done.code == 0 and json.loads(done.stdout)["updates"] == 5
    assert "give a larger --max-updates" in done.stderr, done.stderr

    _edit_last(run, max_updates=None, minutes=60, minutes_left=0.0)  # its minutes all trained
    spent = cli("train", "supernet", "--data", data_dir, "--out", run, "--resume", "--json")
    assert spent.code == 0 and json.loads(spent.stdout)["stopped"] == "minutes"
    assert json.loads(spent.stdout)["updates"] == 5 and "budget is spent" in spent.stderr, spent.stderr
