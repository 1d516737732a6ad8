"""Latency on real devices: datasets of measured SubTransformers and the
predictors fitted on them (``hatc latency fit`` / ``hatc latency predict``)."""

from hatc.latency.dataset import DatasetError, LatencyTable, append_rows, make_row, read_dataset
from hatc.latency.predictor import (
    FitConfig,
    Predictor,
    PredictorError,
    fit_predictor,
    load_predictor,
    register_predictor,
    registered_predictor,
)

__all__ = [
    "DatasetError",
    "FitConfig",
    "LatencyTable",
    "Predictor",
    "PredictorError",
    "append_rows",
    "fit_predictor",
    "load_predictor",
    "make_row",
    "read_dataset",
    "register_predictor",
    "registered_predictor",
]
