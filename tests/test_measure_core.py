"""The latency measurement core with scripted timings: ``_Runner.run`` over fake VMs,
``measure_latency``'s warm-ups, alternation and placements, the trimmed mean and std,
and the paired ratio's spread. No TVM: a fake ``tvm`` module stands in where one is needed."""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hatc.latency import measure
from hatc.latency.measure import Measurement, PairedReference, Protocol, measure_latency, trimmed
from hatc.runtime.signature import GraphSignature
from hatc.space import load_space
from hatc.targets import load_target

# Two decoder layers with different head counts: the caches have different shapes.
SIG = GraphSignature(
    src_len=16, encoder_batch=1, batch=3, capacity=32, vocab_size=20, pad_idx=1, qkv_dim=8,
    self_heads=(2, 4), cross_heads=(2, 1), ende_layers=(1, 2),
)  # fmt: skip
PROTOCOL = Protocol(src_len=10, steps=4, beam=3, bucket=16, warmup=2, repeats=10, trim=0.1, placements=4)


# ----- trimming and the paired ratio ---------------------------------------------------------------
def test_trimmed_drops_the_fastest_and_slowest_fraction():
    # 10 values, trim 0.1: one dropped at each end (1 and 100); kept 2..9.
    mean, std = trimmed([5, 1, 2, 3, 4, 100, 6, 7, 8, 9], 0.1)
    assert mean == pytest.approx(5.5) and std == pytest.approx(math.sqrt(5.25))  # population std of 2..9
    # trim 0.25 of 10: floor(2.5) = 2 at each end; kept 2, 2, 3, 3, 4, 4.
    assert trimmed([60, -5, 2, 3, 4, 50, 0, 4, 3, 2], 0.25) == pytest.approx((3.0, math.sqrt(2 / 3)))
    # Fewer values than one trimmed fraction: nothing dropped.
    assert trimmed([1, 2, 9], 0.1) == pytest.approx((4.0, math.sqrt(38 / 3)))
    # Trimming everything away keeps everything.
    assert trimmed([1.0, 3.0], 0.5) == pytest.approx((2.0, 1.0))


def _measurement(runs, reference_runs) -> Measurement:
    return Measurement(1.0, 1.0, 0.0, 0.0, "local/x86", PROTOCOL, True, "db", 0.0, tuple(runs), 20.0,
                       tuple(reference_runs))  # fmt: skip


def test_paired_ratio_cancels_the_machines_drift():
    # The machine slows by 10% a run; architecture and reference slow together: the ratio stays 2.
    slow = [1 + 0.1 * i for i in range(10)]
    m = _measurement([(10 * s, 30 * s) for s in slow], [(5 * s, 15 * s) for s in slow])
    assert m.paired_ratio_cv == pytest.approx(0.0, abs=1e-12)
    assert m.to_dict()["paired_ratio_cv"] == m.paired_ratio_cv and m.to_dict()["paired_reference_ms"] == 20.0


def test_paired_ratio_cv_is_the_std_over_the_mean_of_per_run_ratios():
    # Ratios alternate 40/20 = 2.0 and 40/25 = 1.6: mean 1.8, population std 0.2.
    m = _measurement([(10.0, 30.0)] * 10, [(5.0, 15.0), (5.0, 20.0)] * 5)
    assert m.paired_ratio_cv == pytest.approx(0.2 / 1.8)
    assert _measurement([(10.0, 30.0)] * 10, []).paired_ratio_cv is None
    assert "paired_ratio_cv" not in replace(_measurement([], []), paired_reference_ms=None).to_dict()


# ----- a fake TVM: VMs whose time_evaluator returns scripted seconds --------------------------------
class FakeTensor:
    def __init__(self, array: Any, dev: Any = "cpu"):
        self.array, self.dev = np.array(array), dev

    def numpy(self) -> np.ndarray:
        return self.array


@dataclass
class FakeGraph:
    """An imported graph: its name and weights."""

    name: str
    owner: str  # "graphs" (the architecture) or "reference"
    params: list[FakeTensor] = field(default_factory=lambda: [FakeTensor(np.ones(2)), FakeTensor(np.float32(3.0))])


@dataclass
class FakeLib:
    """A compiled graph: the seconds its VM's evaluator reports, call by call, and its outputs."""

    graph: FakeGraph
    seconds: Iterator[float]
    outputs: Callable[[tuple], list[FakeTensor]]
    calls: list[dict] = field(default_factory=list)  # every timed call: its inputs and evaluator arguments
    vms: list[FakeVM] = field(default_factory=list)


class FakeVM:
    def __init__(self, lib: FakeLib, dev: Any):
        self.lib, self.dev, self.inputs, self.outputs = lib, dev, None, None
        lib.vms.append(self)

    def set_input(self, func: str, *args: Any) -> None:
        assert func == "main"
        self.inputs = args

    def time_evaluator(self, func: str, dev: Any, number: int, repeat: int) -> Callable[[str], Any]:
        def evaluate(name: str) -> Any:
            self.lib.calls.append({"func": func, "dev": dev, "number": number, "repeat": repeat, "inputs": self.inputs,
                                   "vm": self})  # fmt: skip
            self.outputs = self.lib.outputs(self.inputs)
            return types.SimpleNamespace(mean=next(self.lib.seconds))

        return evaluate

    def get_outputs(self, func: str) -> list[FakeTensor]:
        return self.outputs


@pytest.fixture
def fake_tvm(monkeypatch) -> types.ModuleType:
    tvm = types.ModuleType("tvm")
    tvm.cpu = lambda: "cpu0"
    tvm.cuda = lambda: "cuda0"
    tvm.runtime = types.SimpleNamespace(tensor=FakeTensor)
    tvm.relax = types.SimpleNamespace(VirtualMachine=FakeVM)
    monkeypatch.setitem(sys.modules, "tvm", tvm)
    return tvm


def encoder_outputs(inputs: tuple) -> list[FakeTensor]:
    """src_mask (Be, S) and each layer's cross keys/values, every value distinct."""
    shapes = [shape for shape, _ in SIG.encoder_outputs().values()]
    return [FakeTensor(np.arange(np.prod(s), dtype=np.float32).reshape(s) + 1000 * i) for i, s in enumerate(shapes)]


def decoder_outputs(inputs: tuple) -> list[FakeTensor]:
    """log_probs and the caches, each cache 1 more than the one it was given."""
    caches = inputs[3 : 3 + len(SIG.cache_names())]
    return [FakeTensor(np.zeros((SIG.batch, SIG.vocab_size))), *(FakeTensor(c.array + 1) for c in caches)]


def libs(owner: str, encoder_s: list[float], step_s: list[float]) -> list[FakeLib]:
    encoder, decoder = FakeGraph("encoder", owner), FakeGraph("decoder_step", owner)
    return [FakeLib(encoder, iter(encoder_s), encoder_outputs), FakeLib(decoder, iter(step_s), decoder_outputs)]


def runner(encoder_s: list[float], step_s: list[float]) -> tuple[measure._Runner, list[FakeLib]]:
    built = libs("graphs", encoder_s, step_s)
    graphs = (built[0].graph, built[1].graph)
    return measure._Runner(measure._Built(built, graphs, SIG), load_target("x86"), None, Path("."), 10), built


# ----- _Runner.run ------------------------------------------------------------------------------------
def test_a_run_is_the_encoder_time_and_the_sum_of_the_step_times(fake_tvm):
    r, (enc, dec) = runner([0.002, 0.005], [0.001, 0.0015, 0.002, 0.0025] + [0.01] * 4)
    assert r.run(PROTOCOL) == pytest.approx((2.0, 7.0))  # ms: 2; 1 + 1.5 + 2 + 2.5
    assert r.run(PROTOCOL) == pytest.approx((5.0, 40.0))  # the next run's scripted timings
    assert len(enc.calls) == 2 and len(dec.calls) == 2 * PROTOCOL.steps
    for call in enc.calls + dec.calls:  # device-side time of one call each
        assert (call["func"], call["dev"], call["number"], call["repeat"]) == ("invoke_stateful", "cpu0", 1, 1)


def test_a_run_feeds_the_graphs_as_the_signature_says(fake_tvm):
    r, (enc, dec) = runner([0.001], [0.001] * PROTOCOL.steps)
    r.run(PROTOCOL)
    # The encoder gets the one sentence, padded to the bucket, then its weights as allocated.
    src, *weights = enc.calls[0]["inputs"]
    assert src.array.shape == (SIG.encoder_batch, SIG.src_len) and src.dev == "cpu0"
    assert (src.array[:, 10:] == SIG.pad_idx).all()  # src_len 10 real tokens, the rest padding
    assert ((src.array[:, :10] > SIG.pad_idx) & (src.array[:, :10] < SIG.vocab_size)).all()
    assert weights == r.params[0] and [w.array.tolist() for w in weights] == [[1.0, 1.0], 3.0]
    n_caches = len(SIG.cache_names())
    enc_out = encoder_outputs(())
    for t, call in enumerate(dec.calls):
        tokens, step, mask, *rest = call["inputs"]
        caches, cross, weights = rest[:n_caches], rest[n_caches:-2], rest[-2:]
        assert tokens.array.shape == (SIG.batch, 1) and step.array.tolist() == [t]
        # The encoder's outputs repeated to the beam's rows.
        assert np.array_equal(mask.array, np.repeat(enc_out[0].array, SIG.batch, 0))
        assert all(np.array_equal(c.array, np.repeat(e.array, SIG.batch, 0)) for c, e in zip(cross, enc_out[1:]))
        # Step t gets the caches step t - 1 returned: zeros at first, then 1, 2, ...
        shapes = [shape for shape, _ in (SIG.decoder_inputs()[n] for n in SIG.cache_names())]
        assert [c.array.shape for c in caches] == shapes and all((c.array == t).all() for c in caches)
        assert weights == r.params[1]


def test_allocate_gives_fresh_vms_and_weights(fake_tvm):
    r, (enc, dec) = runner([0.001] * 2, [0.001] * 2 * PROTOCOL.steps)
    r.run(PROTOCOL)
    first_vms, first_params = r.vms, r.params
    r.allocate()
    r.run(PROTOCOL)
    assert len(enc.vms) == len(dec.vms) == 2
    assert enc.calls[0]["vm"] is first_vms[0] and enc.calls[1]["vm"] is enc.vms[1] is r.vms[0]
    assert all(a is not b for a, b in zip(first_params[0], r.params[0]))
    assert dec.calls[-1]["inputs"][-2:] == tuple(r.params[1])


# ----- measure_latency: warm-ups, alternation, placements, statistics --------------------------------
@pytest.fixture
def no_build(monkeypatch, tmp_path) -> Path:
    """Exporting, importing, tuning checks and building replaced by fakes; returns a tuning db path."""
    from hatc.compile import export, tuning_db, tvm_build

    db = tmp_path / "db"
    db.mkdir()
    (db / tuning_db.WORKLOAD_FILE).write_text("")
    monkeypatch.setattr(tuning_db, "load_database", lambda path: "database")
    monkeypatch.setattr(tuning_db, "missing_workloads", lambda graph, target, database: [])
    owner = {}

    def export_onnx(model, directory, bucket, batch):
        assert (bucket, batch) == (PROTOCOL.bucket, PROTOCOL.beam)
        return types.SimpleNamespace(signature=SIG, owner=Path(directory).name)

    monkeypatch.setattr(export, "export_onnx", export_onnx)

    def import_graphs(graphs, target, precision):
        assert precision == PROTOCOL.precision
        return FakeGraph("encoder", graphs.owner), FakeGraph("decoder_step", graphs.owner)

    monkeypatch.setattr(tvm_build, "import_graphs", import_graphs)
    monkeypatch.setattr(tvm_build, "build_module", lambda graph, target, database: owner.setdefault(
        (graph.owner, graph.name), graph))  # fmt: skip
    return db


class ScriptedRunner:
    """Stands in for ``_Runner``: each run returns the next scripted (encoder, decoder) ms."""

    script: dict[str, Iterator[tuple[float, float]]] = {}
    events: list[tuple[str, str]] = []

    def __init__(self, built, target, session, tmp, src_len, name="arch"):
        self.name = name
        self.events.append(("allocate", name))  # the real one allocates once when made

    def allocate(self) -> None:
        self.events.append(("allocate", self.name))

    def run(self, protocol: Protocol) -> tuple[float, float]:
        self.events.append(("run", self.name))
        return next(self.script[self.name])


def test_measure_latency_alternates_discards_warmups_and_trims(no_build, monkeypatch):
    space = load_space("tiny")
    warmups = [(1000.0, 1000.0)] * PROTOCOL.warmup  # slow warm-ups: never counted
    encoder = [5, 1, 2, 3, 4, 100, 6, 7, 8, 9]
    decoder = [40.0] * 9 + [200.0]
    reference = [(5.0, 15.0)] * 9 + [(60.0, 20.0)]
    monkeypatch.setattr(ScriptedRunner, "events", [])
    monkeypatch.setattr(ScriptedRunner, "script", {"arch": iter(warmups + list(zip(encoder, decoder))),
                                                   "reference": iter(warmups + reference)})  # fmt: skip
    monkeypatch.setattr(measure, "_Runner", ScriptedRunner)
    paired = PairedReference(space.smallest())
    m = measure_latency(space.largest(), space, load_target("x86"), PROTOCOL, db=no_build, vocab_size=50,
                        paired=paired)  # fmt: skip

    assert m.encoder_ms == pytest.approx(5.5) and m.encoder_std_ms == pytest.approx(math.sqrt(5.25))
    assert m.decoder_ms == 40.0 and m.decoder_std_ms == 0.0
    assert m.latency_ms == pytest.approx(45.5)
    assert m.runs == tuple(zip(encoder, decoder)) and m.reference_runs == tuple(reference)  # every kept run, in order
    assert m.paired_reference_ms == 20.0  # the 80 ms outlier trimmed
    ratios = [(e + d) / sum(ref) for e, d, ref in zip(encoder, decoder, reference)]
    assert m.paired_ratio_cv == pytest.approx(np.std(ratios) / np.mean(ratios))
    assert m.device == "local/x86" and m.tuned and m.database == str(no_build) and m.protocol == PROTOCOL

    # Warm-ups then kept runs, architecture and reference alternating; fresh placements (both) before
    # kept runs 2, 5 and 7 (placement_starts {0, 2, 5, 7}; the first placement is the warm-ups').
    both = [("run", "arch"), ("run", "reference")]
    fresh = [("allocate", "arch"), ("allocate", "reference")]
    expected = fresh + both * PROTOCOL.warmup
    for i in range(PROTOCOL.repeats):
        expected += (fresh if i in (2, 5, 7) else []) + both
    assert ScriptedRunner.events == expected
    assert paired.built is not None and paired.built.libs[0].owner == "reference"


def test_measure_latency_with_real_runners_over_fake_vms(no_build, fake_tvm, monkeypatch):
    """The whole path from the evaluator's seconds to the Measurement: the architecture's encoder
    takes 2 ms and its steps 0.5 ms, the reference's 1 ms and 0.25 ms, the warm-ups 1 s."""
    made: dict[tuple[str, str], FakeLib] = {}

    def timings(owner: str, name: str, warm_s: float, s: float) -> Iterator[float]:
        calls = 1 if name == "encoder" else PROTOCOL.steps
        return iter([warm_s] * calls * PROTOCOL.warmup + [s] * calls * PROTOCOL.repeats)

    def build_module(graph, target, database):
        base = (2e-3 if graph.name == "encoder" else 5e-4) / (2 if graph.owner == "reference" else 1)
        outputs = encoder_outputs if graph.name == "encoder" else decoder_outputs
        return made.setdefault((graph.owner, graph.name), FakeLib(graph, timings(graph.owner, graph.name, 1.0, base),
                                                                  outputs))  # fmt: skip

    from hatc.compile import tvm_build

    monkeypatch.setattr(tvm_build, "build_module", build_module)
    space = load_space("tiny")
    m = measure_latency(space.largest(), space, load_target("x86"), PROTOCOL, db=no_build, vocab_size=50,
                        paired=PairedReference(space.smallest()))  # fmt: skip
    assert m.encoder_ms == pytest.approx(2.0) and m.decoder_ms == pytest.approx(PROTOCOL.steps * 0.5)
    assert m.encoder_std_ms == pytest.approx(0.0) and m.paired_reference_ms == pytest.approx(1.0 + PROTOCOL.steps / 4)
    assert m.paired_ratio_cv == pytest.approx(0.0, abs=1e-12) and len(m.runs) == len(m.reference_runs) == 10
    # One VM per graph and placement: the first (warm-ups and kept runs 0-1), then three fresh ones.
    assert all(len(lib.vms) == PROTOCOL.placements for lib in made.values())
    assert all(next(lib.seconds, None) is None for lib in made.values())  # every scripted timing used
