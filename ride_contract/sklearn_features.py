"""The features as the first step of a scikit-learn pipeline: ride frames in, feature frames out.

Training and analysis only (pandas, scikit-learn); the values come from
``ride_contract.features``, which the serving function calls directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin

from ride_contract.features import FEATURE_COLUMNS, feature_matrix
from ride_contract.ride import NYC, RIDE_COLUMNS, Ride


def rides_frame(rides: Iterable[Ride | Mapping[str, Any]]) -> pd.DataFrame:
    """Model input for validated rides (or plain dicts with the ride fields)."""
    rows = [ride.model_input() if isinstance(ride, Ride) else {c: ride[c] for c in RIDE_COLUMNS} for ride in rides]
    return pd.DataFrame(rows, columns=RIDE_COLUMNS)


def ride_features(rides: pd.DataFrame) -> pd.DataFrame:
    """Request-time features of a frame with the ``RIDE_COLUMNS``."""
    pickup = pd.to_datetime(rides["datetime"], format="ISO8601")
    if pickup.dt.tz is not None:  # as a Ride does: aware times become naive NYC local time
        pickup = pickup.dt.tz_convert(NYC).dt.tz_localize(None)
    features = feature_matrix(
        pickup.to_numpy(dtype="datetime64[ns]"),
        rides["PULocationID"].to_numpy(),
        rides["DOLocationID"].to_numpy(),
        rides["trip_distance"].to_numpy(dtype=np.float64),
    )
    frame = pd.DataFrame(features, columns=FEATURE_COLUMNS, index=rides.index)
    integers = ["PULocationID", "DOLocationID", "PU_DO", "pickup_weekday"]
    return frame.astype(dict.fromkeys(integers, "int64"))


class RideFeaturizer(TransformerMixin, BaseEstimator):
    """First step of every model pipeline: raw ride columns in, features out."""

    def fit(self, X: pd.DataFrame, y: Any = None) -> RideFeaturizer:
        return self

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        return ride_features(X)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.asarray(FEATURE_COLUMNS, dtype=object)
