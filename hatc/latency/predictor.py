"""Latency predictors: fit on a dataset, pick by validation, report on test,
save as one JSON file, register per (target, space).

The split is fixed so that results compare across runs and tools:
``numpy.random.default_rng(seed).permutation(n)``, the first 80% train, the next
10% validation, the last 10% test; every row is kept. The target is encoder +
decoder mean latency (ms). Every candidate model (``regressors.MODEL_KINDS``)
trains on the train split; the simplest one whose validation MAPE is within a
standard error of the least (``pick_model``) is kept and its test accuracy
recorded in the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

import hatc
from hatc import atomic
from hatc.arch import Architecture
from hatc.errors import HatcError, SpaceError
from hatc.features import HAT_FEATURE_NAMES, layer_feature_names
from hatc.latency.dataset import LatencyTable
from hatc.latency.regressors import (
    MODEL_KINDS,
    BoostedTrees,
    CostLinear,
    Ensemble,
    HatMLP,
    Inputs,
    Progress,
    arch_inputs,
    model_from_dict,
)
from hatc.paths import cache_dir
from hatc.space import SearchSpace, load_space

FILE_FORMAT = "hatc-latency-predictor"
FILE_VERSION = 1
SPLIT_RULE = "numpy.random.default_rng(seed).permutation(n): first 80% train, next 10% validation, last 10% test"
MIN_ROWS = 20
FEATURE_SETS = ("hat", "layer")  # HAT's 10 averages; per-layer inputs too (hatc data, arch known)
SIMPLICITY = ("cost-linear", "hybrid", "ensemble", "gbt", "hat-mlp")  # pick_model's preference order
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class PredictorError(HatcError):
    """A predictor file is missing, malformed, or made for something else."""


# ----- split and metrics -------------------------------------------------------------
def split_indices(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the train, validation and test splits (80/10/10, every row kept)."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_valid = int(0.8 * n), int(0.1 * n)
    return order[:n_train], order[n_train : n_train + n_valid], order[n_train + n_valid :]


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b: ties in either ranking shrink the denominator (NaN when one side is all ties)."""
    import scipy.stats  # only when scoring a fit: it adds ~0.5 s to every import of this module

    if len(x) < 2:
        return float("nan")  # SciPy returns NaN too, with a warning
    # variant="b" (SciPy's default) is the tau-b hatc has always recorded; "c" (Stuart's) differs on ties.
    return float(scipy.stats.kendalltau(x, y, variant="b").statistic)


def accuracy(y: np.ndarray, pred: np.ndarray) -> dict[str, float | int]:
    """MAPE, shares within 5% and 10% (fractions), Kendall tau, RMSE (ms), n."""
    rel = np.abs(pred - y) / y
    return {
        "mape": float(np.mean(rel)),
        "within_5": float(np.mean(rel <= 0.05)),
        "within_10": float(np.mean(rel <= 0.10)),
        "kendall_tau": kendall_tau(y, pred),
        "rmse_ms": float(np.sqrt(np.mean((pred - y) ** 2))),
        "n": int(len(y)),
    }


# ----- the predictor -------------------------------------------------------------------
@dataclass
class Predictor:
    """A fitted latency model and everything needed to trust and reuse it."""

    model: Any
    space: SearchSpace
    features: str  # "hat" (HAT's 10) or "layer" (per-layer inputs too)
    target: str | None
    protocol: dict[str, Any]
    provenance: str
    seed: int
    metrics: dict[str, Any]  # test accuracy of the kept model
    info: dict[str, Any] = field(default_factory=dict)  # dataset, split, candidates, versions, time
    fitted: dict[str, Any] = field(default_factory=dict, repr=False)  # every candidate after a fit; not saved

    @property
    def model_kind(self) -> str:
        return self.model.kind

    @property
    def emulated(self) -> bool:
        """Fitted on an emulated device's rows: it predicts no real device's latency."""
        return bool((self.info.get("dataset") or {}).get("emulated", False))

    def predict_many(self, archs: list[Architecture]) -> np.ndarray:
        """Predicted latency (ms) of each architecture, in one batch."""
        return self.model.predict(arch_inputs(list(archs), self.space, self.features))

    def predict(self, arch: Architecture) -> float:
        """Predicted latency (ms) of one architecture."""
        return float(self.predict_many([arch])[0])

    def to_dict(self) -> dict[str, Any]:
        model = self.model.to_dict()
        names = list(HAT_FEATURE_NAMES) if self.features == "hat" else layer_feature_names(self.space)
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "target": self.target,
            "space": self.space.name,
            "space_definition": self.space.to_dict(),
            "features": self.features,
            "feature_names": names,
            "latency": "encoder_ms + decoder_ms",
            "model_kind": self.model.kind,
            "scaling": model["scaling"],
            "protocol": self.protocol,
            "provenance": self.provenance,
            "seed": self.seed,
            "metrics": self.metrics,
            **self.info,
            "model": model,
        }

    def save(self, path: str | Path) -> Path:
        """Writes the predictor atomically (``hatc.atomic``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic.write_text(path, json.dumps(self.to_dict(), separators=(",", ":")) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "predictor") -> Predictor:
        if not isinstance(d, dict) or d.get("format") != FILE_FORMAT:
            raise PredictorError(f"{source}: not a hatc latency predictor file")
        if d.get("version") != FILE_VERSION:
            version = d.get("version")
            raise PredictorError(f"{source}: predictor file version {version!r}; this hatc reads {FILE_VERSION}")
        if d.get("features") not in FEATURE_SETS:
            raise PredictorError(
                f"{source}: unknown feature set {d.get('features')!r}; known: {', '.join(FEATURE_SETS)}"
            )
        try:
            space = SearchSpace.from_dict(d["space_definition"], f"{source}: space_definition")
            model = model_from_dict(d["model"])
            info_keys = ("dataset", "split", "candidates", "versions", "created")
            return cls(
                model=model,
                space=space,
                features=d["features"],
                target=d["target"],
                protocol=d["protocol"],
                provenance=d["provenance"],
                seed=d["seed"],
                metrics=d["metrics"],
                info={k: d[k] for k in info_keys if k in d},
            )
        except (KeyError, TypeError, ValueError, SpaceError) as e:
            raise PredictorError(f"{source}: malformed predictor file ({type(e).__name__}: {e})") from None


def load_predictor(
    path: str | Path, target: str | None = None, space: str | None = None, features: str | None = None
) -> Predictor:
    """Loads a predictor file; raises PredictorError if it was made for another
    target, space or feature set than the ones asked for (None: any)."""
    path = Path(path)
    if not path.is_file():
        raise PredictorError(f"{path}: no such predictor file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PredictorError(f"{path}: not a JSON predictor file") from None
    pred = Predictor.from_dict(data, str(path))
    for what, asked, have in (("target", target, pred.target), ("space", space, pred.space.name)):
        if asked is not None and asked != have:
            made_for = f"{what} '{have}'" if have is not None else f"no {what}"
            raise PredictorError(
                f"{path}: predictor is for {made_for}, not '{asked}'; "
                f"fit one with: hatc latency fit --dataset FILE --target {target or pred.target} "
                f"--space {space or pred.space.name}"
            )
    if features is not None and features != pred.features:
        raise PredictorError(f"{path}: predictor uses feature set '{pred.features}', not '{features}'")
    return pred


# ----- registry ---------------------------------------------------------------------------
def registry_path(target: str, space: str, precision: str = "fp32") -> Path:
    """Where the default predictor for (target, space, precision) lives (fp32: ``TARGET--SPACE.json``)."""
    for what, name in (("target", target), ("space", space), ("precision", precision)):
        if not _NAME.match(name):
            raise PredictorError(f"{what} name '{name}' must be letters, digits, '_', '.', '+' or '-'")
    suffix = "" if precision == "fp32" else f"--{precision}"
    return cache_dir() / "predictors" / f"{target}--{space}{suffix}.json"


def predictor_precision(pred: Predictor) -> str:
    """The precision of the builds whose latency ``pred`` predicts (rows before precisions: fp32)."""
    return str((pred.protocol or {}).get("precision", "fp32"))


def register_predictor(pred: Predictor) -> Path:
    """Makes ``pred`` the default predictor for its (target, space, precision); atomic.
    An emulated device's predictor is never a default (give it as ``--predictor FILE``)."""
    if pred.target is None:
        raise PredictorError("a predictor needs a target to be registered; give --target")
    if pred.emulated:
        raise PredictorError(
            "a predictor fitted on an emulated device's timings is never registered as a default; "
            "save it with --out FILE and give it as --predictor FILE"
        )
    return pred.save(registry_path(pred.target, pred.space.name, predictor_precision(pred)))


def registered_predictor(target: str, space: str | SearchSpace, precision: str = "fp32") -> Predictor:
    """The default predictor for (target, space, precision), as ``hatc latency fit`` registered it."""
    name = space.name if isinstance(space, SearchSpace) else space
    path = registry_path(target, name, precision)
    if not path.is_file():
        quantize = "" if precision == "fp32" else f" --quantize {precision}"
        raise PredictorError(
            f"no {precision} latency predictor registered for target '{target}' and space '{name}'; "
            f"collect a dataset (hatc latency collect --target {target} --space {name}{_where(target)}{quantize} "
            f"--out FILE) and run: hatc latency fit --dataset FILE --target {target} --space {name}"
        )
    return load_predictor(path, target=target, space=name)


def _where(target: str) -> str:
    """`` --tracker HOST:PORT`` for a target measured on devices of a tracker (a board, a GPU)."""
    from hatc.errors import HatcError
    from hatc.targets import load_target

    try:
        tgt = load_target(target)
    except HatcError:
        return ""
    return " --tracker HOST:PORT" if tgt.is_cross or tgt.device != "cpu" else ""


# ----- fitting ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FitConfig:
    """How a predictor is fitted."""

    seed: int = 0
    models: tuple[str, ...] = MODEL_KINDS
    mlp_steps: int = 5000  # HAT's; tests lower it
    gbt_rounds: int = 3000  # an upper bound: early stopping on validation picks the count


def _subset(inputs: Inputs, idx: np.ndarray) -> Inputs:
    return {k: v[idx] for k, v in inputs.items()}


def table_inputs(table: LatencyTable) -> tuple[Inputs, str]:
    """The model inputs of a dataset, and its feature set (``layer`` when the
    architectures are known, else ``hat``)."""
    if table.archs is not None and table.space is not None:
        return arch_inputs(table.archs, table.space, "layer"), "layer"
    return {"hat": table.hat}, "hat"


def resolve_space(table: LatencyTable, space: str | None) -> SearchSpace:
    """The dataset's space: the rows' own (hatc), else ``space``, else guessed
    from a HAT file name (``iwslt*``, ``wmt*``)."""
    if table.space is not None:
        if space is not None and load_space(space).name != table.space.name:
            raise PredictorError(f"{table.source}: rows are from space '{table.space.name}', not '{space}'")
        return table.space
    if space is not None:
        return load_space(space)
    stem = Path(table.source).name.lower()
    for name in ("iwslt", "wmt"):
        if stem.startswith(name):
            return load_space(name)
    raise PredictorError(f"{table.source}: cannot tell the design space from the file name; give --space")


def fit_predictor(
    table: LatencyTable,
    target: str | None = None,
    space: str | None = None,
    config: FitConfig | None = None,
    progress: Progress | None = None,
) -> Predictor:
    """Fits every candidate model, keeps the best on validation, reports on test.

    Args:
        table: the measured dataset.
        target: the hatc target the latencies belong to (default: the rows' own).
        space: the design space (default: the rows' own, or guessed from a HAT file name).
        config: seed, candidate models and training lengths.
        progress: called as ``progress(task, done, total)`` while fitting.

    Returns:
        The kept predictor; ``info["candidates"]`` holds every candidate's
        validation and test accuracy.
    """
    config = config or FitConfig()
    unknown = [m for m in config.models if m not in MODEL_KINDS]
    if unknown or not config.models:
        raise PredictorError(f"unknown model(s) {', '.join(unknown) or '(none)'}; known: {', '.join(MODEL_KINDS)}")
    if len(table) < MIN_ROWS:
        raise PredictorError(f"{table.source}: {len(table)} rows; a fit needs at least {MIN_ROWS}")
    if table.target is not None and target is not None and target != table.target:
        raise PredictorError(f"{table.source}: rows were measured on target '{table.target}', not '{target}'")
    search_space = resolve_space(table, space)
    inputs, features = table_inputs(table)
    y = table.latency_ms
    if np.any(y <= 0):
        row = int(np.flatnonzero(y <= 0)[0])
        raise PredictorError(f"{table.source}: row {row + 1} has latency {y[row]} ms; latencies must be positive")
    train, valid, test = split_indices(len(y), config.seed)
    tr, va = _subset(inputs, train), _subset(inputs, valid)

    def want(*kinds: str) -> bool:
        return any(k in config.models for k in kinds)

    # Progress in rough MLP-step equivalents: a tree or linear fit takes a second or two.
    total = (config.mlp_steps if want("hat-mlp") else 0) + 200 * sum(
        want(*ks) for ks in (("cost-linear", "hybrid", "ensemble"), ("gbt", "ensemble"), ("hybrid", "ensemble"))
    )
    done = 0

    def report(task: str, n: int = 0, _total: int = 0) -> None:
        if progress is not None:
            progress(task, min(done + n, total), total)

    built: dict[str, Any] = {}
    if want("hat-mlp"):
        built["hat-mlp"] = HatMLP().fit(tr, y[train], config.seed, steps=config.mlp_steps, progress=report)
        done += config.mlp_steps
    if want("cost-linear", "hybrid", "ensemble"):
        built["cost-linear"] = CostLinear().fit(tr, y[train])
        done += 200
        report("cost-linear")
    if want("gbt", "ensemble"):
        built["gbt"] = BoostedTrees().fit(tr, y[train], config.seed, config.gbt_rounds)
        done += 200
        report("gbt")
    if want("hybrid", "ensemble"):
        built["hybrid"] = BoostedTrees(base=built["cost-linear"]).fit(tr, y[train], config.seed, config.gbt_rounds)
        done += 200
        report("hybrid")
    if want("ensemble"):
        built["ensemble"] = Ensemble([built["cost-linear"], built["gbt"], built["hybrid"]])
    fitted = {kind: built[kind] for kind in config.models}

    candidates = {
        kind: {
            "valid": accuracy(y[valid], model.predict(va)),
            "test": accuracy(y[test], model.predict(_subset(inputs, test))),
        }
        for kind, model in fitted.items()
    }
    best = pick_model({kind: np.abs(model.predict(va) - y[valid]) / y[valid] for kind, model in fitted.items()})
    test_acc = dict(candidates[best]["test"])
    n_test = test_acc.pop("n")
    metrics = {**test_acc, "n_test": n_test, "model": best}
    protocol = table.protocol or {
        "src_len": search_space.source_tokens,
        "steps": search_space.target_tokens,
        "beam": 5,
        "runtime": "eager PyTorch (fairseq)",
    }
    return Predictor(
        model=fitted[best],
        space=search_space,
        features=features,
        target=target or table.target,
        protocol=protocol,
        provenance=table.provenance,
        seed=config.seed,
        metrics=metrics,
        info={
            "dataset": {
                "path": str(Path(table.source).resolve()),
                "format": table.format,
                "rows": len(table),
                "skipped_drift": table.skipped_drift,
                "devices": list(table.devices),
                # Paired rows were scaled to each device's median reference: predictions are at that speed.
                "paired_nominal_ms": table.paired_nominal_ms,
                "emulated": table.emulated,
            },
            "split": {"rule": SPLIT_RULE, "train": len(train), "valid": len(valid), "test": len(test)},
            "candidates": candidates,
            "versions": _versions(),
            "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        },
        fitted=fitted,
    )


def pick_model(valid_errors: dict[str, np.ndarray]) -> str:
    """The simplest model whose validation MAPE is within one standard error
    of the best one's (the paired SE of the per-row differences).

    Validation holds a few hundred rows: a model that wins by less than the
    noise is not better, and the simpler one extrapolates better to the
    space's extremes (a sum of costs does; trees are flat past their data)."""
    best = min(valid_errors, key=lambda k: float(np.mean(valid_errors[k])))
    for kind in sorted(valid_errors, key=SIMPLICITY.index):
        diff = valid_errors[kind] - valid_errors[best]
        if kind == best or np.mean(diff) <= np.std(diff, ddof=1) / np.sqrt(len(diff)):
            return kind
    return best


def _versions() -> dict[str, str]:
    import xgboost

    return {"hatc": hatc.__version__, "numpy": np.__version__, "xgboost": xgboost.__version__}
