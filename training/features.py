"""The model's features, computed from ride requests: defined once, shipped inside every model.

This module and ``training.ride`` travel inside every logged model (MLflow
``code_paths``), so the serving function validates and featurizes rides with
exactly the code the model was trained with: serving cannot drift from training.
Keep imports light (pandas, numpy, scikit-learn, pydantic): they run at cold start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin

# Re-exported: the serving function reaches the schema through the model's copy of this module.
from training.ride import RIDE_COLUMNS, InvalidRide, Ride, parse_ride

__all__ = [
    "FEATURE_COLUMNS",
    "RIDE_COLUMNS",
    "InvalidRide",
    "Ride",
    "RideFeaturizer",
    "parse_ride",
    "ride_features",
    "rides_frame",
]

PAIR_CODE_BASE = 1000  # above the largest zone ID
FEATURE_COLUMNS = ["PULocationID", "DOLocationID", "PU_DO", "trip_distance", "pickup_hour", "pickup_weekday"]


def rides_frame(rides: Iterable[Ride | Mapping[str, Any]]) -> pd.DataFrame:
    """Model input for validated rides (or plain dicts with the ride fields)."""
    rows = [ride.model_input() if isinstance(ride, Ride) else {c: ride[c] for c in RIDE_COLUMNS} for ride in rides]
    return pd.DataFrame(rows, columns=RIDE_COLUMNS)


def ride_features(rides: pd.DataFrame) -> pd.DataFrame:
    """Request-time features of a frame with the ``RIDE_COLUMNS``."""
    pickup = pd.to_datetime(rides["datetime"], format="ISO8601")
    pu = rides["PULocationID"].astype("int64").to_numpy()
    do = rides["DOLocationID"].astype("int64").to_numpy()
    return pd.DataFrame(
        {
            "PULocationID": pu,
            "DOLocationID": do,
            # The zone pair as one integer (34 -> 56 is 34056), not a string: the target
            # encoder looks integers up ~10x faster, and that is the serving hot path.
            "PU_DO": pu * PAIR_CODE_BASE + do,
            "trip_distance": rides["trip_distance"].astype("float64").to_numpy(),
            # Fractional hour: rush hour starts at 7:30, not at 7 or 8.
            "pickup_hour": (pickup.dt.hour + pickup.dt.minute / 60).to_numpy(),
            "pickup_weekday": pickup.dt.day_of_week.to_numpy(),
        },
        index=rides.index,
    )


class RideFeaturizer(TransformerMixin, BaseEstimator):
    """First step of every model pipeline: raw ride columns in, features out."""

    def fit(self, X: pd.DataFrame, y: Any = None) -> RideFeaturizer:
        return self

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        return ride_features(X)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.asarray(FEATURE_COLUMNS, dtype=object)
