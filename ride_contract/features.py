"""The model's request-time features, defined once: training's pipeline and the serving function both call this.

Numpy only: the serving function runs it at every ride without pandas or
scikit-learn. Training wraps it in a pipeline step (``ride_contract.sklearn_features``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PAIR_CODE_BASE = 1000  # above the largest zone ID
FEATURE_COLUMNS = ["PULocationID", "DOLocationID", "PU_DO", "trip_distance", "pickup_hour", "pickup_weekday"]
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0, as pandas and datetime count)


def feature_matrix(pickup: np.ndarray, pu: np.ndarray, do: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Features of n rides, one row each, columns in ``FEATURE_COLUMNS`` order (float64).

    ``pickup`` is naive NYC local time as datetime64; the others are numbers."""
    pu = np.asarray(pu, dtype=np.int64)
    do = np.asarray(do, dtype=np.int64)
    days = pickup.astype("datetime64[D]")
    minute_of_day = (pickup.astype("datetime64[m]") - days).astype(np.int64)
    features = np.empty((len(pu), len(FEATURE_COLUMNS)), dtype=np.float64)
    features[:, 0] = pu
    features[:, 1] = do
    # The zone pair as one integer (34 -> 56 is 34056), not a string: it is looked up, never parsed.
    features[:, 2] = pu * PAIR_CODE_BASE + do
    features[:, 3] = distance
    # Fractional hour: rush hour starts at 7:30, not at 7 or 8.
    features[:, 4] = minute_of_day // 60 + (minute_of_day % 60) / 60
    features[:, 5] = (days.astype(np.int64) + _EPOCH_WEEKDAY) % 7
    return features


def ride_feature_matrix(rides: Sequence[Any]) -> np.ndarray:
    """``feature_matrix`` of validated rides (``ride_contract.ride.Ride``)."""
    return feature_matrix(
        np.array([ride.datetime for ride in rides], dtype="datetime64[us]"),
        np.array([ride.PULocationID for ride in rides]),
        np.array([ride.DOLocationID for ride in rides]),
        np.array([ride.trip_distance for ride in rides], dtype=np.float64),
    )


def __getattr__(name: str) -> Any:
    # Models logged before the pipeline step moved to ride_contract.sklearn_features pickled it
    # under this module; they still unpickle (scikit-learn is imported only then).
    if name == "RideFeaturizer":
        from ride_contract.sklearn_features import RideFeaturizer

        return RideFeaturizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
