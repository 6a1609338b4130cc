"""Write a fitted pipeline's serving form (``ride_contract.serving_form``), from the pipeline itself.

Nothing is re-implemented here: the zone encodings and the pair target encoding are the
fitted encoders' own output for every zone pair, the bins are the regressor's own bin
mapper's, and the trees are the nodes scikit-learn grew. ``check_parity`` then scores real
rides both ways, and training refuses to log a model whose two forms disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import Pipeline

from ride_contract.features import FEATURE_COLUMNS
from ride_contract.ride import MIN_LOCATION_ID, RIDE_COLUMNS
from ride_contract.serving_form import FORMAT, PAIR_BASE, ForestForm, LinearForm, ServingForm
from ride_contract.sklearn_features import RideFeaturizer, ride_features

# The encoders may read these features: a ride's zones. Everything else must pass through as it is.
PAIR_FEATURES = ("PULocationID", "DOLocationID", "PU_DO")
# Training refuses to log a model whose serving form differs from its pipeline by more than this.
PARITY_TOLERANCE_MINUTES = 0.01
# The point model's loss, and the range's quantile models'.
SERVED_LOSSES = ("squared_error", "quantile")


class NotExportable(ValueError):
    """The pipeline has a step the serving form cannot express."""


def _pair_domain() -> pd.DataFrame:
    """Features for every zone pair, in pair-table order (row = PU * PAIR_BASE + DO); other features fixed."""
    zones = np.arange(PAIR_BASE)
    pu, do = np.repeat(zones, PAIR_BASE), np.tile(zones, PAIR_BASE)
    # Zone 0 does not exist; its rows are never looked up (rides are validated), so they take zone 1's values.
    pu, do = np.maximum(pu, MIN_LOCATION_ID), np.maximum(do, MIN_LOCATION_ID)
    pickup = np.full(len(pu), np.datetime64("2021-01-04T08:00"), dtype="datetime64[ns]")
    # Through the pipeline's own feature step, as the encoders saw their training rides.
    return ride_features(pd.DataFrame({"datetime": pickup, "PULocationID": pu, "DOLocationID": do, "trip_distance": 1.0}))


def _split_inputs(encode: Any) -> tuple[list[int], list[int], list[str]]:
    """The encoder's output columns: those computed from the zones, and those passed through (with their feature)."""
    pair_inputs, numeric_inputs, numeric_features = [], [], []
    # As specified, not as fitted: a fitted ColumnTransformer holds "passthrough" as an identity FunctionTransformer.
    specified = {name: transformer for name, transformer, _ in encode.transformers}
    specified["remainder"] = encode.remainder
    for name, transformer, columns in encode.transformers_:
        outputs = list(range(encode.output_indices_[name].start, encode.output_indices_[name].stop))
        if transformer == "drop" or not outputs:
            continue
        columns = [FEATURE_COLUMNS[c] if isinstance(c, int | np.integer) else c for c in columns]
        if set(columns) <= set(PAIR_FEATURES):
            pair_inputs += outputs
        elif isinstance(specified.get(name), str) and specified[name] == "passthrough":
            numeric_inputs += outputs
            numeric_features += columns
        else:
            raise NotExportable(f"step {name!r} transforms {columns}; only zone features may be encoded")
    return pair_inputs, numeric_inputs, numeric_features


def _steps(pipeline: Pipeline) -> tuple[Any, Any]:
    steps = list(pipeline.named_steps.values())
    if len(steps) != 3 or not isinstance(steps[0], RideFeaturizer):
        raise NotExportable("expected a pipeline of RideFeaturizer, a ColumnTransformer and a regressor")
    return steps[1], steps[2]


def serving_arrays(pipeline: Pipeline) -> dict[str, np.ndarray]:
    """The serving form's arrays for a fitted pipeline (see ``ride_contract.serving_form``)."""
    encode, regressor = _steps(pipeline)
    pair_inputs, numeric_inputs, numeric_features = _split_inputs(encode)
    encoded = encode.transform(_pair_domain())  # sparse for a one-hot encoding
    common = {
        "format": np.array(FORMAT),
        "feature_columns": np.array(FEATURE_COLUMNS),
        "numeric_features": np.array([FEATURE_COLUMNS.index(f) for f in numeric_features]),
    }
    if isinstance(regressor, LinearRegression):
        coefficients = np.asarray(regressor.coef_, dtype=np.float64).ravel()
        pair_share = np.asarray(encoded[:, pair_inputs] @ coefficients[pair_inputs]).ravel()
        pair_share += float(np.ravel(regressor.intercept_)[0])
        return {
            **common,
            "kind": np.array(LinearForm.kind),
            "pair_table": pair_share,
            "numeric_coefficients": coefficients[numeric_inputs],
        }
    if isinstance(regressor, HistGradientBoostingRegressor):
        return {**common, **_forest_arrays(regressor, np.asarray(encoded, dtype=np.float64), pair_inputs, numeric_inputs)}
    raise NotExportable(f"no serving form for {type(regressor).__name__}")


def _forest_arrays(regressor: Any, encoded: np.ndarray, pair_inputs: list[int], numeric_inputs: list[int]) -> dict:
    # Both have the identity link: a prediction is the baseline plus the trees' leaf values, nothing after.
    if regressor.loss not in SERVED_LOSSES:
        raise NotExportable(f"only the {' and '.join(SERVED_LOSSES)} losses are served (identity link), not {regressor.loss!r}")
    binner = regressor._bin_mapper
    if binner.missing_values_bin_idx_ != 255:
        raise NotExportable(f"expected the missing-value bin at 255, found {binner.missing_values_bin_idx_}")
    pair_bins = binner.transform(encoded)[:, pair_inputs]
    edges = [np.asarray(binner.bin_thresholds_[i], dtype=np.float64) for i in numeric_inputs]
    trees = [predictors[0] for predictors in regressor._predictors]  # one tree per iteration for a regressor
    nodes = np.concatenate([tree.nodes for tree in trees])
    bitset_base = np.cumsum([0] + [len(tree.binned_left_cat_bitsets) for tree in trees])
    sizes = [len(tree.nodes) for tree in trees]
    return {
        "kind": np.array(ForestForm.kind),
        "pair_table": pair_bins.astype(np.uint8),
        "pair_inputs": np.array(pair_inputs),
        "numeric_inputs": np.array(numeric_inputs),
        "bin_edges": np.concatenate(edges) if edges else np.zeros(0),
        "bin_edge_offsets": np.cumsum([0] + [len(e) for e in edges]),
        "baseline": np.asarray(regressor._baseline_prediction, dtype=np.float64).ravel()[0],
        "tree_offsets": np.cumsum([0, *sizes]),
        "node_feature": nodes["feature_idx"].astype(np.uint8),
        "node_bin_threshold": nodes["bin_threshold"].astype(np.uint8),
        "node_missing_left": nodes["missing_go_to_left"].astype(bool),
        "node_is_leaf": nodes["is_leaf"].astype(bool),
        "node_left": nodes["left"].astype(np.int32),
        "node_right": nodes["right"].astype(np.int32),
        "node_value": nodes["value"].astype(np.float64),
        "node_is_categorical": nodes["is_categorical"].astype(bool),
        # Each tree numbers its bitsets from 0; here they are rows of one array.
        "node_bitset_row": (nodes["bitset_idx"] + np.repeat(bitset_base[:-1], sizes)).astype(np.int32),
        "category_bitsets": np.concatenate([tree.binned_left_cat_bitsets for tree in trees]).astype(np.uint32),
    }


def write(pipeline: Pipeline, path: Path) -> Path:
    np.savez_compressed(path, **serving_arrays(pipeline))
    return path


def max_difference(pipeline: Pipeline, form: ServingForm, rides: pd.DataFrame) -> float:
    """Largest |serving form - pipeline| in minutes over ``rides`` (a frame with the ride columns)."""
    expected = pipeline.predict(rides[RIDE_COLUMNS])
    served = form.predict_features(ride_features(rides[RIDE_COLUMNS]).to_numpy(dtype=np.float64))
    return float(np.max(np.abs(served - expected))) if len(rides) else 0.0


def check_parity(pipeline: Pipeline, form: ServingForm, rides: pd.DataFrame) -> float:
    difference = max_difference(pipeline, form, rides)
    if difference > PARITY_TOLERANCE_MINUTES:
        raise NotExportable(
            f"the serving form differs from the pipeline by up to {difference:.4f} min on {len(rides):,} rides "
            f"(tolerance {PARITY_TOLERANCE_MINUTES} min); not logging a model that would serve other answers"
        )
    return difference
