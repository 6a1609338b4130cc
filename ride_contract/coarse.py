"""The backend's instant estimate: per pickup hour, minutes = intercept + slope * miles.

Fitted on real trips by ``training.coarse`` and shipped as a JSON file of 48
numbers, so the backend answers at once without loading the full model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ride_contract.ride import Ride


class CoarseEstimator:
    def __init__(self, intercepts: list[float], slopes: list[float], max_distance: float, trained_on: str = ""):
        if len(intercepts) != 24 or len(slopes) != 24:
            raise ValueError("a coarse estimator needs 24 hourly intercepts and slopes")
        self.intercepts = np.asarray(intercepts, dtype=float)
        self.slopes = np.asarray(slopes, dtype=float)
        self.max_distance = float(max_distance)
        self.trained_on = trained_on

    def predict(self, pickup_hours: Any, miles: Any) -> np.ndarray:
        """Minutes for arrays (or scalars) of pickup hours 0-23 and trip miles."""
        hours = np.asarray(pickup_hours, dtype=int)
        miles = np.clip(np.asarray(miles, dtype=float), 0, self.max_distance)
        return np.clip(self.intercepts[hours] + self.slopes[hours] * miles, 1.0, 60.0)

    def predict_ride(self, ride: Ride) -> float:
        return float(self.predict(ride.datetime.hour, ride.trip_distance))

    def to_dict(self) -> dict[str, Any]:
        return {
            "intercepts": self.intercepts.round(4).tolist(),
            "slopes": self.slopes.round(4).tolist(),
            "max_distance": self.max_distance,
            "trained_on": self.trained_on,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CoarseEstimator:
        return cls(data["intercepts"], data["slopes"], data["max_distance"], data.get("trained_on", ""))
