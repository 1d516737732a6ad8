"""``hatc search --tracker HOST:PORT --collect N``: the predictor the search needs, made first.

With no predictor for (target, space) the headline command cannot run; given a tracker
its devices can measure one: ``collect_and_fit`` collects N architectures of the
checkpoint's space on every device of the key (``hatc latency collect``, resumable: the
dataset lives in the search's output folder), fits a predictor on them (``hatc latency
fit``), registers it as the default for (target, space, precision) unless the devices
are emulated, and returns its file for the search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from hatc import atomic
from hatc.errors import HatcError
from hatc.space import BUILTIN_SPACES, SearchSpace, load_space


@dataclass(frozen=True)
class CollectFirst:
    """What ``--collect`` was given."""

    rows: int  # architectures to measure
    tracker: str
    key: str | None
    db: Path | None  # tuning database (default: the target's)
    allow_emulated: bool
    precision: str


def space_argument(space: SearchSpace, folder: Path) -> str:
    """The ``--space`` value for ``space``: its name when built in, else a YAML file written to ``folder``."""
    if space.name in BUILTIN_SPACES and load_space(space.name) == space:
        return space.name
    path = folder / f"space-{space.name}.yaml"
    atomic.write_text(path, yaml.safe_dump(space.to_dict(), sort_keys=False))
    return str(path)


def collect_and_fit(
    target: str,
    space: SearchSpace,
    vocab_size: int,
    out: Path,
    first: CollectFirst,
    say: Callable[[str], None],
) -> Path:
    """Collects ``first.rows`` latencies into ``out`` and fits a predictor; its file.

    Raises:
        HatcError: bad input or no device (before anything is measured), or too few rows.
    """
    from hatc.latency.collect_job import CollectRequest, collect_dataset
    from hatc.latency.dataset import read_dataset
    from hatc.latency.predictor import fit_predictor, register_predictor

    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if first.precision == "fp32" else f"-{first.precision}"
    dataset = out / f"latency-{target}-{space.name}{suffix}.jsonl"
    request = CollectRequest(
        target=target, space=space_argument(space, out), out=dataset, n=first.rows, tracker=first.tracker,
        key=first.key, db=first.db, vocab_size=vocab_size, precision=first.precision,
        allow_emulated=first.allow_emulated,
    )  # fmt: skip

    def on_row(row: dict, summary: object, total: int) -> None:
        mark = " (emulated)" if row.get("emulated") else ""
        say(f"measured {row['latency_ms']:.2f} ms{mark} on {row['device']}")

    say(f"collecting {first.rows} latencies into {dataset} (--collect {first.rows}; re-running resumes it)")
    collect_dataset(request, on_row=on_row, on_log=say)
    table = read_dataset(dataset)
    predictor = fit_predictor(table, target)  # the rows carry their space (a file space too)
    path = predictor.save(out / f"predictor{suffix}.json")
    if predictor.emulated:
        say(f"predictor of an emulated device saved to {path} (never registered as a default)")
    else:
        say(f"predictor registered as the default for {target}/{space.name}: {register_predictor(predictor)}")
    return path


def check_collect_first(first: CollectFirst | None, predictor: Path | None) -> None:
    if first is not None and predictor is not None:
        raise HatcError("give --predictor FILE or --collect N (which fits one), not both")
