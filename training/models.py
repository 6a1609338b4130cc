"""Model pipelines: the feature step, encoders and a regressor, as one sklearn Pipeline.

Every pipeline starts with ``RideFeaturizer`` so a logged model takes raw rides.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import KFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, TargetEncoder

from ride_contract.sklearn_features import RideFeaturizer

ZONE_COLUMNS = ["PULocationID", "DOLocationID"]
# HistGradientBoosting takes at most 255 bins per categorical feature; rare zones share one.
MAX_ZONE_CATEGORIES = 250
RANDOM_SEED = 0

# Chosen on Jan->Feb 2021: val RMSE 5.35, test (Mar) 5.25, about 4 s to fit on 2 cores.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "hgb": {"learning_rate": 0.05, "max_iter": 500, "max_leaf_nodes": 63, "min_samples_leaf": 40, "l2_regularization": 0.0},
    "linear": {},
}
MODEL_FAMILIES = tuple(DEFAULT_PARAMS)
# What the logged model needs at load time; exact versions so serving matches training.
RUNTIME_PACKAGES = ("scikit-learn", "pandas", "numpy", "pyarrow", "pydantic", "cloudpickle")


def _hgb(params: dict[str, Any]) -> Pipeline:
    encode = ColumnTransformer(
        [
            (
                "zones",
                OrdinalEncoder(
                    handle_unknown="use_encoded_value",
                    unknown_value=np.nan,
                    max_categories=MAX_ZONE_CATEGORIES,
                ),
                ZONE_COLUMNS,
            ),
            # A zone pair has too many values for one-hot; its mean duration
            # (cross-fitted, so training rows do not see their own target) is one number.
            ("pair", TargetEncoder(target_type="continuous", cv=KFold(5, shuffle=True, random_state=RANDOM_SEED)), ["PU_DO"]),
        ],
        remainder="passthrough",
    )
    # Numpy between the steps, zones first: with pandas input HistGradientBoosting would
    # build its own encoder again, and serving pays for every step on every single ride.
    regressor = HistGradientBoostingRegressor(categorical_features=[0, 1], random_state=RANDOM_SEED, **params)
    return Pipeline([("features", RideFeaturizer()), ("encode", encode), ("regressor", regressor)])


def _linear(params: dict[str, Any]) -> Pipeline:
    # The course baseline: one-hot zone pair plus distance.
    encode = ColumnTransformer(
        [("pair", OneHotEncoder(handle_unknown="ignore"), ["PU_DO"]), ("distance", "passthrough", ["trip_distance"])]
    )
    return Pipeline([("features", RideFeaturizer()), ("encode", encode), ("regressor", LinearRegression(**params))])


def build_pipeline(family: str, params: dict[str, Any] | None = None) -> Pipeline:
    builders = {"hgb": _hgb, "linear": _linear}
    if family not in builders:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(MODEL_FAMILIES)}")
    return builders[family]({**DEFAULT_PARAMS[family], **(params or {})})


def suggest_params(trial: Any, family: str) -> dict[str, Any]:
    """Optuna search space around the defaults (first trial is always the defaults)."""
    if family != "hgb":
        return {}
    return {
        "learning_rate": trial.suggest_float("learning_rate", 0.03, 0.15, log=True),
        "max_iter": trial.suggest_int("max_iter", 200, 600, step=100),
        "max_leaf_nodes": trial.suggest_int("max_leaf_nodes", 31, 127, log=True),
        "min_samples_leaf": trial.suggest_int("min_samples_leaf", 20, 100, log=True),
        "l2_regularization": trial.suggest_float("l2_regularization", 0.0, 5.0),
    }


def pip_requirements() -> list[str]:
    return [f"{name}=={version(name)}" for name in RUNTIME_PACKAGES]
