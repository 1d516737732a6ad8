"""The latency models a predictor chooses from, and the inputs they read.

Inputs are named matrices, one row per architecture:
- ``hat``: HAT's 10 features (all a HAT CSV records);
- ``layer``: hatc's per-layer encoding (``hatc.features.layer_features``);
- ``cost``: per-layer counts (how many layers chose each value), crossed with
  the embedding dim: a linear model over them is a sum of per-layer costs.

Models (all map inputs to latency in ms, all saved as plain JSON):
- ``hat-mlp``: HAT's predictor re-implemented (10 -> 400 x 4 -> 1, ReLU, MSE,
  Adam lr 1e-5, batch 128, 5000 steps, HAT's feature normalization).
- ``cost-linear``: latency as a sum of per-part costs, fitted for least
  relative absolute error (IRLS). Robust: HAT's data has blocks of rows
  measured 25% slow (drift); an L1 fit ignores them where MSE chases them.
- ``gbt``: gradient-boosted trees (xgboost) on log latency, absolute error.
- ``hybrid``: ``gbt`` boosted from ``cost-linear``'s prediction (the trees fit
  what the sum of costs misses).
- ``ensemble``: the geometric mean of its members.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.optimize

from hatc.arch import Architecture
from hatc.features import hat_features, layer_features
from hatc.space import SearchSpace

Inputs = dict[str, np.ndarray]
Progress = Callable[[str, int, int], None]  # (task, done, total)
MODEL_KINDS = ("hat-mlp", "cost-linear", "gbt", "hybrid", "ensemble")
_FLOOR_MS = 1e-3  # predictions are latencies: never <= 0, even far outside the data


# ----- inputs ----------------------------------------------------------------------
def arch_inputs(archs: Sequence[Architecture], space: SearchSpace, features: str) -> Inputs:
    """The inputs a model reads, computed from architectures.

    Args:
        archs: the architectures, one row each.
        space: the space whose super layer counts fix the per-layer encoding.
        features: ``hat`` (HAT's 10) or ``layer`` (adds per-layer inputs).
    """
    out = {"hat": np.stack([hat_features(a) for a in archs]) if archs else np.zeros((0, 10))}
    if features == "layer":
        out["layer"] = np.stack([layer_features(a, space) for a in archs])
        out["cost"] = np.stack([cost_counts(a, space) for a in archs])
    return out


def cost_counts(arch: Architecture, space: SearchSpace) -> np.ndarray:
    """Per-layer choices counted per value, crossed with the side's embed dim.

    A constant and the counts of each FFN/heads/ende value, once per encoder
    (decoder) embed choice; plus the encoder layers attended, summed over
    decoder layers, per encoder embed (cross-attention keys/values are projected
    from encoder outputs)."""
    c = space.choices
    out: list[float] = []
    enc = [(arch.encoder_ffn_dims, c["encoder_ffn_dim"]), (arch.encoder_self_heads, c["encoder_self_heads"])]
    dec = [
        (arch.decoder_ffn_dims, c["decoder_ffn_dim"]),
        (arch.decoder_self_heads, c["decoder_self_heads"]),
        (arch.decoder_cross_heads, c["decoder_cross_heads"]),
        (arch.decoder_ende_layers, c["decoder_ende_layers"]),
    ]
    for embed_choices, embed, parts in (
        (c["encoder_embed_dim"], arch.encoder_embed_dim, enc),
        (c["decoder_embed_dim"], arch.decoder_embed_dim, dec),
    ):
        block = [1.0] + [float(list(values).count(v)) for values, options in parts for v in options]
        for e in embed_choices:
            out += block if embed == e else [0.0] * len(block)
    for e in c["encoder_embed_dim"]:
        out.append(float(sum(arch.decoder_ende_layers)) if arch.encoder_embed_dim == e else 0.0)
    return np.array(out, dtype=np.float64)


def hat_terms(x: np.ndarray) -> np.ndarray:
    """HAT's 10 features expanded into per-part cost terms.

    Averages times layer counts are sums over layers; per-layer costs are about
    linear in FFN dim, heads and layers attended, and depend on the embed dim,
    so each sum appears alone and times the embed dim."""
    ee, el, ef, eh, de, dl, df, dh, dc, da = x.T
    cols = [np.ones_like(ee), de, ee, de * ee]
    for term in (dl, dl * df, dl * dh, dl * dc, dl * da, dl * da * ee):
        cols += [term, term * de]
    for term in (el, el * ef, el * eh):
        cols += [term, term * ee]
    return np.stack(cols, axis=1)


def design(inputs: Inputs, which: str) -> np.ndarray:
    """One model's design matrix: ``terms`` (cost terms), ``trees`` (tree inputs) or ``hat``."""
    if which == "hat":
        return inputs["hat"]
    if which == "terms":
        return inputs["cost"] if "cost" in inputs else hat_terms(inputs["hat"])
    if which == "trees":
        if "layer" in inputs:
            return np.hstack([inputs["layer"], inputs["hat"]])
        return np.hstack([inputs["hat"], hat_terms(inputs["hat"])])
    raise ValueError(f"unknown design '{which}'")


# ----- models ------------------------------------------------------------------------
class CostLinear:
    """Sum of per-part costs, fitted for least sum of |error| / latency."""

    kind = "cost-linear"

    def __init__(self, coef: np.ndarray | None = None, scale: np.ndarray | None = None) -> None:
        self.coef, self.scale = coef, scale

    def fit(self, inputs: Inputs, y: np.ndarray, iters: int = 50) -> CostLinear:
        a = design(inputs, "terms")
        scale = np.abs(a).max(axis=0)
        self.scale = np.where(scale > 0, scale, 1.0)
        a = a / self.scale
        # Per-layer counts of each choice (hatc data) have one physical cost each, never negative:
        # unconstrained least squares on a few dozen rows made some negative and predicted ~0 ms for
        # whole regions of the space. HAT's averaged terms need signed corrections, so stay free.
        nonnegative = "cost" in inputs
        weight = 1.0 / y  # start from relative least squares
        for _ in range(iters):
            if nonnegative:
                coef, _ = scipy.optimize.nnls(a * weight[:, None], y * weight)
            else:
                coef, *_ = np.linalg.lstsq(a * weight[:, None], y * weight, rcond=None)
            # IRLS for L1: weight^2 = 1 / (y |residual|), floored so exact fits stay finite.
            rel = np.abs(y - a @ coef) / y
            weight = 1.0 / (y * np.sqrt(np.maximum(rel, 1e-4)))
        self.coef = coef
        return self

    def predict(self, inputs: Inputs) -> np.ndarray:
        return np.maximum((design(inputs, "terms") / self.scale) @ self.coef, _FLOOR_MS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "scaling": {"input": "cost terms divided by column max", "target": "ms"},
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostLinear:
        return cls(np.array(d["coef"], dtype=np.float64), np.array(d["scale"], dtype=np.float64))


class BoostedTrees:
    """xgboost on log latency with absolute error (a median, robust to drift);
    optionally boosted from a base model's prediction."""

    def __init__(self, base: CostLinear | None = None, booster: Any = None) -> None:
        self.base, self.booster = base, booster
        self.kind = "hybrid" if base is not None else "gbt"

    def _params(self, seed: int) -> dict[str, Any]:
        # Shallower trees on top of a base: they only fit what the base misses.
        depth, child = (3, 5) if self.base is not None else (4, 3)
        return {
            "objective": "reg:absoluteerror",
            "max_depth": depth,
            "min_child_weight": child,
            "eta": 0.03,
            "subsample": 0.8,
            "colsample_bytree": 0.8,
            "nthread": 1,  # deterministic, and these fits take seconds
            "seed": seed,
        }

    def _margin(self, inputs: Inputs) -> np.ndarray | None:
        return None if self.base is None else np.log(self.base.predict(inputs))

    def fit(self, inputs: Inputs, y: np.ndarray, seed: int, rounds: int = 3000) -> BoostedTrees:
        """Fits on ``inputs``: a tenth of them picks the number of rounds (early
        stopping), then all of them are fitted with that many. The caller's
        validation split stays untouched, so it can compare models fairly."""
        import xgboost as xgb

        x, target, margin = design(inputs, "trees"), np.log(y), self._margin(inputs)
        order = np.random.default_rng(seed).permutation(len(y))
        stop, rest = order[: max(1, len(y) // 10)], order[max(1, len(y) // 10) :]

        def matrix(idx: np.ndarray) -> Any:
            return xgb.DMatrix(x[idx], label=target[idx], base_margin=None if margin is None else margin[idx])

        params = self._params(seed)
        probe = xgb.train(
            params, matrix(rest), rounds, evals=[(matrix(stop), "stop")], early_stopping_rounds=200, verbose_eval=False
        )
        self.booster = xgb.train(params, matrix(order), probe.best_iteration + 1)
        return self

    def predict(self, inputs: Inputs) -> np.ndarray:
        x = design(inputs, "trees")
        if len(x) == 0:
            return np.zeros(0)
        margin = self._margin(inputs)
        out = self.booster.inplace_predict(x) if margin is None else self.booster.inplace_predict(x, base_margin=margin)
        return np.maximum(np.exp(np.asarray(out, dtype=np.float64)), _FLOOR_MS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "scaling": {"input": "raw", "target": "log ms"},
            "base": None if self.base is None else self.base.to_dict(),
            "xgboost": json.loads(bytes(self.booster.save_raw("json")).decode()),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BoostedTrees:
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(bytearray(json.dumps(d["xgboost"]).encode()))
        booster.set_param({"nthread": 1})
        return cls(None if d["base"] is None else CostLinear.from_dict(d["base"]), booster)


class HatMLP:
    """HAT's latency MLP. Trained with torch; predicts with numpy (no torch
    import when a search calls it)."""

    kind = "hat-mlp"
    FEATURE_NORM = np.array([640, 6, 2048, 6, 640, 6, 2048, 6, 6, 2], dtype=np.float64)  # HAT's configs
    HIDDEN, LAYERS = 400, 4

    def __init__(self, weights: list[tuple[np.ndarray, np.ndarray]] | None = None, lat_norm: float = 1.0) -> None:
        self.weights, self.lat_norm = weights or [], lat_norm

    def fit(
        self,
        inputs: Inputs,
        y: np.ndarray,
        seed: int,
        steps: int = 5000,
        batch: int = 128,
        lr: float = 1e-5,
        progress: Progress | None = None,
    ) -> HatMLP:
        import torch

        # HAT divides latency by a per-device constant near its mean (200 or 300 ms).
        self.lat_norm = float(np.mean(y))
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sizes = [10] + [self.HIDDEN] * self.LAYERS
            layers = [torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])] + [torch.nn.Linear(self.HIDDEN, 1)]
        net = torch.nn.Sequential(*[m for lin in layers[:-1] for m in (lin, torch.nn.ReLU())], layers[-1])
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        threads = torch.get_num_threads()
        # A 128 x 400 batch is too small to gain from threads; with other work on the cores they cost 10x.
        torch.set_num_threads(1)
        try:
            self._train(net, opt, inputs, y, gen, steps, batch, progress)
        finally:
            torch.set_num_threads(threads)
        self.weights = [(lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()) for lin in layers]
        return self

    def _train(
        self,
        net: Any,
        opt: Any,
        inputs: Inputs,
        y: np.ndarray,
        gen: Any,
        steps: int,
        batch: int,
        progress: Progress | None,
    ) -> None:
        import torch

        x_t = torch.tensor(inputs["hat"] / self.FEATURE_NORM, dtype=torch.float32)
        y_t = torch.tensor(y / self.lat_norm, dtype=torch.float32)
        batch = min(batch, len(x_t))
        for step in range(steps):
            idx = torch.randperm(len(x_t), generator=gen)[:batch]  # HAT: random.sample, no replacement
            loss = torch.nn.functional.mse_loss(net(x_t[idx]).squeeze(1), y_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if progress is not None and (step + 1) % 100 == 0:
                progress("hat-mlp", step + 1, steps)

    def predict(self, inputs: Inputs) -> np.ndarray:
        h = inputs["hat"] / self.FEATURE_NORM
        for i, (w, b) in enumerate(self.weights):
            h = h @ w.T + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        return np.maximum(h[:, 0] * self.lat_norm, _FLOOR_MS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "scaling": {"input": "HAT features / " + str(self.FEATURE_NORM.tolist()), "target": "ms / lat_norm"},
            "lat_norm": self.lat_norm,
            # float32 little-endian, base64: a tenth the size of JSON numbers, still no pickle.
            "layers": [{"shape": list(w.shape), "weight": _b64(w), "bias": _b64(b)} for w, b in self.weights],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HatMLP:
        weights = [(_unb64(layer["weight"]).reshape(layer["shape"]), _unb64(layer["bias"])) for layer in d["layers"]]
        return cls(weights, float(d["lat_norm"]))


class Ensemble:
    """Geometric mean of its members' predictions."""

    kind = "ensemble"

    def __init__(self, members: list[Any]) -> None:
        self.members = members

    def predict(self, inputs: Inputs) -> np.ndarray:
        return np.exp(np.mean([np.log(m.predict(inputs)) for m in self.members], axis=0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "scaling": {"combine": "geometric mean"},
            "members": [m.to_dict() for m in self.members],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ensemble:
        return cls([model_from_dict(m) for m in d["members"]])


def model_from_dict(d: dict[str, Any]) -> Any:
    """Rebuilds any model from its ``to_dict``."""
    kind = d.get("kind")
    if kind == "cost-linear":
        return CostLinear.from_dict(d)
    if kind in ("gbt", "hybrid"):
        return BoostedTrees.from_dict(d)
    if kind == "hat-mlp":
        return HatMLP.from_dict(d)
    if kind == "ensemble":
        return Ensemble.from_dict(d)
    raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def _unb64(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4").astype(np.float64)
