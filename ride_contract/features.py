"""The model's request-time features, computed from rides: the first step of every model pipeline.

The serving function featurizes with the model's own copy of this module (it
travels in the model's ``code/`` folder). Keep imports light (pandas, numpy,
scikit-learn): they run at cold start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin

from ride_contract.ride import RIDE_COLUMNS, Ride

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
