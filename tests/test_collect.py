"""``hatc latency collect``: the plan, resumable append-only rows, drift bookkeeping, and
real collections (tuned builds, measured) locally and across two RPC servers on loopback,
one of them killed mid-run, and a collection interrupted with Ctrl-C and resumed."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import BEAM, VOCAB
from rpc_helpers import hatc_process, running_server, running_tracker, wait_until

from hatc.arch import Architecture, arch_key
from hatc.errors import HatcError
from hatc.latency.collect import (
    CollectConfig,
    collect,
    drop_torn_tail,
    measured_keys,
    plan_architectures,
)
from hatc.latency.dataset import make_row, read_dataset
from hatc.space import load_space

KEY = "hatc-test-collect"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def data_rows(path: Path) -> list[dict]:
    return [r for r in rows(path) if not r.get("reference")]


def collect_args(out: Path, db: Path, n: int, *extra: str) -> list[str]:
    # Drift is tested with a synthetic device: a loaded test machine drifts for real.
    return [
        "latency", "collect", "--target", "x86", "--space", "tiny", "--n", str(n), "--out", str(out),
        "--db", str(db), "--beam", str(BEAM), "--vocab-size", str(VOCAB), "--repeats", "3", "--warmup", "1",
        "--seed", "3", "--drift-tolerance", "100", *extra,
    ]  # fmt: skip


# ----- the bookkeeping, with a synthetic device (drift cannot be ordered from real hardware) ----
class FakeDevice:
    """Latency = a fixed function of the arch; 1.5x slower on the calls in ``slow_calls``."""

    def __init__(self, space, fail_on: set[str] = frozenset(), slow_calls: range = range(0)):
        self.space, self.calls, self.fail_on, self.slow_calls = space, 0, set(fail_on), slow_calls

    def latency(self, arch: Architecture) -> float:
        return 3 * (1.0 + sum(arch.encoder_ffn_dims) / 1000 + arch.decoder_layers)

    def __call__(self, arch: Architecture) -> dict:
        call, self.calls = self.calls, self.calls + 1
        key = arch_key(arch)
        if key in self.fail_on:
            self.fail_on.discard(key)  # fails once, then works
            raise ConnectionError("device went away")
        ms = self.latency(arch) * (1.5 if call in self.slow_calls else 1.0)
        protocol = {"src_len": 30, "steps": 30, "beam": 4, "repeats": 3}
        return make_row(arch, self.space, ms / 3, 2 * ms / 3, 0.0, 0.0, "fake", protocol, {})


def test_plan_is_seeded_starts_with_the_extremes_and_extends():
    space = load_space("tiny")
    plan = plan_architectures(space, 20, seed=1)
    assert plan[0] == space.smallest() and plan[1] == space.largest()
    assert len({arch_key(a) for a in plan}) == 20
    assert plan == plan_architectures(space, 20, seed=1)
    assert plan_architectures(space, 30, seed=1)[:20] == plan  # a larger --n extends the same plan
    assert plan_architectures(space, 20, seed=2)[2:] != plan[2:]


def test_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"arch": {"enc')
    assert drop_torn_tail(path) and path.read_text() == '{"a": 1}\n'
    assert not drop_torn_tail(path)


def test_failures_requeue_and_every_arch_is_written_once(tmp_path):
    space = load_space("tiny")
    plan = plan_architectures(space, 12, seed=0)
    device = FakeDevice(space, fail_on={arch_key(plan[3]), arch_key(plan[7])})
    out = tmp_path / "rows.jsonl"
    summary = collect(plan, space, out, device, workers=3, config=CollectConfig(reference_every=4))
    assert summary.measured == 12 and len(summary.failures) == 2
    assert sorted(arch_key(r["arch"]) for r in data_rows(out)) == sorted(arch_key(a) for a in plan)
    again = collect(plan, space, out, device, workers=2)  # everything is there: nothing is measured
    assert (again.skipped, again.measured) == (12, 0)


def test_a_time_limit_stops_taking_work_and_a_rerun_continues(tmp_path):
    space = load_space("tiny")
    plan = plan_architectures(space, 6, seed=0)
    out = tmp_path / "rows.jsonl"
    first = collect(plan, space, out, FakeDevice(space), workers=1, minutes=0.0)
    assert (first.measured, first.unfinished) == (0, 6)
    second = collect(plan, space, out, FakeDevice(space), workers=1)
    assert (second.measured, second.unfinished) == (6, 0)


def test_an_error_no_retry_can_fix_stops_the_collection(tmp_path):
    space = load_space("tiny")

    def untuned(arch):
        raise HatcError("no tuning database for target 'x86'")

    with pytest.raises(HatcError, match="no tuning database"):
        collect(plan_architectures(space, 5, seed=0), space, tmp_path / "rows.jsonl", untuned, workers=2)


def test_noisy_rows_are_measured_again_and_the_steadier_kept(tmp_path):
    """Unpaired rows by their runs' spread (10%), paired rows by their ratio's (15%)."""
    space = load_space("tiny")
    plan = plan_architectures(space, 6, seed=0)[2:]  # not the largest: that is the drift reference
    spreads = {  # arch -> the noise its successive measurements report
        arch_key(plan[0]): [{"decoder_std_ms": 5.0}, {"decoder_std_ms": 0.1}],  # over 10%: again, the second kept
        arch_key(plan[1]): [{"paired_ratio_cv": 0.12}],  # paired, under 15%: once
        arch_key(plan[2]): [{"paired_ratio_cv": 0.30}, {"paired_ratio_cv": 0.40}],  # again, the first kept
        arch_key(plan[3]): [{}],  # steady: once
    }
    device = FakeDevice(space)

    def noisy(arch):
        row = device(arch)
        return {**row, **spreads[arch_key(arch)].pop(0)} if arch_key(arch) in spreads else row

    out = tmp_path / "rows.jsonl"
    summary = collect(plan, space, out, noisy, workers=1, reference=space.largest())
    kept = {arch_key(r["arch"]): r for r in data_rows(out)}
    assert summary.outliers_remeasured == 2 and len(kept) == 4
    assert kept[arch_key(plan[0])]["decoder_std_ms"] == 0.1 and kept[arch_key(plan[0])]["outlier_remeasured"]
    assert kept[arch_key(plan[2])]["paired_ratio_cv"] == 0.30 and kept[arch_key(plan[2])]["outlier_remeasured"]
    assert not any(kept[arch_key(plan[i])].get("outlier_remeasured") for i in (1, 3))

    spreads[arch_key(plan[0])] = [{"decoder_std_ms": 5.0}]  # with remeasure_outliers=False: written as measured
    kept_as_is = collect(plan[:1], space, tmp_path / "as-is.jsonl", noisy, workers=1, reference=space.largest(),
                         config=CollectConfig(remeasure_outliers=False))  # fmt: skip
    assert kept_as_is.outliers_remeasured == 0 and data_rows(tmp_path / "as-is.jsonl")[0]["decoder_std_ms"] == 5.0


def test_a_drifted_device_gets_its_rows_flagged_and_measured_again(tmp_path):
    space = load_space("tiny")
    plan = plan_architectures(space, 9, seed=0)
    # One worker, a reference every 3 rows: calls are ref, 3 rows, ref, 3 rows, ref, ...
    # A disturbance slows calls 6-9: two rows, the second reference check and its confirmation.
    device = FakeDevice(space, slow_calls=range(6, 10))
    out = tmp_path / "rows.jsonl"
    logs: list[str] = []
    config = CollectConfig(reference_every=3, drift_tolerance=0.1)
    summary = collect(plan, space, out, device, workers=1, config=config, on_log=logs.append)
    flagged = [r for r in data_rows(out) if r.get("drift")]
    again = [r for r in data_rows(out) if r.get("remeasured")]
    assert summary.drifts == 1 and len(flagged) == 3 and any("moved +50.0% again" in line for line in logs)
    assert {arch_key(r["arch"]) for r in flagged} == {arch_key(r["arch"]) for r in again}
    table = read_dataset(out)  # flagged rows and references are not training data
    assert len(table) == 9
    assert sorted(table.latency_ms) == pytest.approx(sorted(device.latency(a) for a in plan))
    assert measured_keys(out) == {arch_key(a) for a in plan}


def test_one_odd_reference_check_is_confirmed_before_rows_are_flagged(tmp_path):
    space = load_space("tiny")
    plan = plan_architectures(space, 9, seed=0)
    device = FakeDevice(space, slow_calls=range(8, 9))  # only the second reference check is slow
    out = tmp_path / "rows.jsonl"
    logs: list[str] = []
    config = CollectConfig(reference_every=3, drift_tolerance=0.1)
    summary = collect(plan, space, out, device, workers=1, config=config, on_log=logs.append)
    assert summary.drifts == 0 and not [r for r in data_rows(out) if r.get("drift") or r.get("remeasured")]
    assert logs == ["fake: the reference moved +50.0%; checking it once more"]
    assert summary.references == 5 and summary.measured == 9  # first, odd, confirming, third, last


# ----- real collections: tuned TVM builds measured under the protocol -------------------------
def test_collect_across_two_servers_survives_one_being_killed(tuned, tmp_path):
    db = tuned[0]
    out = tmp_path / "rows.jsonl"
    n = 4
    log = tmp_path / "collect.log"
    with (
        running_tracker(tmp_path / "tracker.log") as tracker,
        running_server(tracker, KEY, tmp_path / "s1.log") as first,
        running_server(tracker, KEY, tmp_path / "s2.log") as second,
    ):
        args = collect_args(out, db, n, "--tracker", tracker, "--key", KEY, "--json")
        with hatc_process(args, log) as proc:
            wait_until(lambda: out.exists() and data_rows(out), proc, log, 600, "a first row")
            # A device dies in the middle of a measurement: whichever runs the next one.
            busy = None
            while busy is None and proc.poll() is None:  # a tight poll: a measurement lasts seconds
                busy = next((s for s in (first, second) if s.running_a_module()), None)
                time.sleep(0.02)
            assert busy is not None, log.read_text()[-3000:]
            busy.kill()
            assert proc.wait(900) == 0, log.read_text()[-3000:]
    report = json.loads(log.read_text().strip().splitlines()[-1])
    assert report["workers"] == 2 and report["measured"] == n and report["failures"] >= 1
    keys = [arch_key(r["arch"]) for r in data_rows(out)]
    plan = plan_architectures(load_space("tiny"), n, seed=3)  # the CLI's plan
    assert sorted(keys) == sorted(arch_key(a) for a in plan)  # each exactly once
    for row in rows(out):
        assert row["device"].startswith(f"{tracker}/{KEY}@127.0.0.1:") and row["protocol"]["beam"] == BEAM
        assert row["encoder_ms"] > 0 and row["decoder_ms"] > 0 and row["versions"]["tvm"]
        assert len(row["layer_features"]) > 0 and row["host_cpu"]
        assert row["paired_reference_ms"] > 0  # the reference ran alternating with it, on the same device
    table = read_dataset(out)
    assert len(table) == n and set(table.paired_nominal_ms) == {r["device"] for r in data_rows(out)}


def test_an_interrupted_collection_resumes(tuned, tmp_path):
    """Stopped by SIGTERM (as a job scheduler stops it; Ctrl-C takes the same path:
    both raise KeyboardInterrupt), then resumed."""
    db = tuned[0]
    out = tmp_path / "rows.jsonl"
    n = 3
    log = tmp_path / "first.log"
    with hatc_process(collect_args(out, db, n), log) as proc:
        wait_until(lambda: out.exists() and data_rows(out), proc, log, 600, "a first row")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130, log.read_text()[-2000:]
    assert "run the same command to resume" in log.read_text()
    kept = len(data_rows(out))
    assert 1 <= kept < n
    log = tmp_path / "second.log"
    with hatc_process([*collect_args(out, db, n), "--json"], log) as proc:
        assert proc.wait(600) == 0, log.read_text()[-2000:]
    report = json.loads(log.read_text().strip().splitlines()[-1])
    assert (report["skipped"], report["measured"]) == (kept, n - kept)
    assert len({arch_key(r["arch"]) for r in data_rows(out)}) == len(data_rows(out)) == n


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tracker", "127.0.0.1:9", "--key", "rpi4-qemu"], "emulated device"),
        (["--n", "0"], "--n"),
    ],
)
def test_bad_collections_are_one_line_and_exit_2(cli, tmp_path, extra, message):
    result = cli(*collect_args(tmp_path / "rows.jsonl", tmp_path / "db", 3), *extra)
    assert result.code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "rows.jsonl").exists()


@pytest.mark.parametrize(("held", "flag", "asked"), [({}, "--no-paired", []), ({"paired_reference_ms": 80.0},
                         "--paired", ["--no-paired"])])  # fmt: skip
def test_resuming_a_file_of_the_other_pairing_is_refused(cli, tmp_path, held, flag, asked):
    """fit scales paired rows only when every row is paired: a file never mixes them."""
    space = load_space("tiny")
    out = tmp_path / "rows.jsonl"
    row = make_row(space.smallest(), space, 1.0, 2.0, 0.0, 0.0, "local/x86", {"src_len": 30, "steps": 30, "beam": 4,
                   "repeats": 3}, {}, **held)  # fmt: skip
    out.write_text(json.dumps(row) + "\n")
    result = cli(*collect_args(out, tmp_path / "db", 3), *asked)
    assert result.code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"resume it with {flag}" in result.stderr and out.read_text().count("\n") == 1


def test_no_device_of_the_key_is_one_clear_line(cli, tmp_path):
    with running_tracker(tmp_path / "tracker.log") as tracker:
        start = time.monotonic()
        result = cli(*collect_args(tmp_path / "rows.jsonl", tmp_path / "db", 3), "--tracker", tracker,
                     "--key", "nobody", "--wait-devices", "1")  # fmt: skip
        assert time.monotonic() - start < 30
    assert result.code == 2 and "no device with key 'nobody' registered" in result.stderr


def test_resuming_a_file_that_is_not_utf8_is_one_line(cli, tmp_path):
    out = tmp_path / "rows.jsonl"
    out.write_bytes(b'{"arch": "caf\xe9"}\n')
    result = cli(*collect_args(out, tmp_path / "db", 3))
    assert result.code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{out}:1: not UTF-8" in result.stderr and out.read_bytes() == b'{"arch": "caf\xe9"}\n'


def test_a_file_of_emulated_rows_takes_no_real_devices_rows(cli, tmp_path):
    """An emulated device's rows (--allow-emulated) describe no real device: a file never mixes them."""
    space = load_space("tiny")
    out = tmp_path / "rows.jsonl"
    row = make_row(space.smallest(), space, 1.0, 2.0, 0.0, 0.0, "t/rpi4-qemu@h:1", {"src_len": 30, "steps": 30,
                   "beam": 4, "repeats": 3}, {}, paired_reference_ms=3.0, emulated=True)  # fmt: skip
    out.write_text(json.dumps(row) + "\n")
    result = cli(*collect_args(out, tmp_path / "db", 3))
    assert result.code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "holds emulated rows" in result.stderr and out.read_text().count("\n") == 1


def test_an_emulated_key_is_measured_only_when_allowed():
    from hatc.latency.measure import LatencyError, measurement_key
    from hatc.targets import load_target

    rpi4 = load_target("rpi4")
    with pytest.raises(LatencyError, match="--allow-emulated"):
        measurement_key(rpi4, "127.0.0.1:9190", "rpi4-qemu")
    assert measurement_key(rpi4, "127.0.0.1:9190", "rpi4-qemu", allow_emulated=True) == "rpi4-qemu"
    assert measurement_key(rpi4, "127.0.0.1:9190", None) == "rpi4"
