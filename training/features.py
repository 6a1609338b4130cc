"""The ride request schema and the model's features, defined once.

This module travels inside every logged model (MLflow ``code_paths``), so the
serving function validates and featurizes rides with exactly the code the model
was trained with: serving cannot drift from training. Keep its imports light
(pandas, numpy, scikit-learn, pydantic) because it is imported at cold start.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sklearn.base import BaseEstimator, TransformerMixin

# TLC zone IDs: 1..263 are zones, 264/265 are "Unknown"/"Outside of NYC".
MIN_LOCATION_ID = 1
MAX_LOCATION_ID = 265
# Longest plausible NYC taxi ride; larger values in TLC files are meter glitches.
MAX_TRIP_DISTANCE_MILES = 200.0
NYC = ZoneInfo("America/New_York")

RIDE_COLUMNS = ["datetime", "PULocationID", "DOLocationID", "trip_distance"]
FEATURE_COLUMNS = ["PULocationID", "DOLocationID", "PU_DO", "trip_distance", "pickup_hour", "pickup_weekday"]

LocationId = Annotated[int, Field(ge=MIN_LOCATION_ID, le=MAX_LOCATION_ID, strict=True)]


class Ride(BaseModel):
    """A ride request: only what is known when the ride is booked."""

    # Unknown fields are rejected rather than ignored: a typo such as
    # "trip_distanse" must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    ride_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")] | None = None
    datetime: dt.datetime = Field(description='Pickup time, e.g. "2022-06-23 11:36:42" (NYC local time)')
    PULocationID: LocationId
    DOLocationID: LocationId
    trip_distance: Annotated[float, Field(gt=0, le=MAX_TRIP_DISTANCE_MILES, strict=True)]

    @field_validator("datetime", mode="before")
    @classmethod
    def _datetime_from_text(cls, value: Any) -> dt.datetime:
        # Only text or datetimes: pydantic would otherwise read numbers as epoch seconds.
        if isinstance(value, dt.datetime):
            parsed = value
        elif isinstance(value, str):
            try:
                parsed = dt.datetime.fromisoformat(value.strip())
            except ValueError as exc:
                raise ValueError('expected "YYYY-MM-DD HH:MM:SS"') from exc
        else:
            raise ValueError('expected a string "YYYY-MM-DD HH:MM:SS"')
        # TLC timestamps are naive NYC local time; convert aware inputs to that.
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(NYC).replace(tzinfo=None)
        return parsed

    def model_input(self) -> dict[str, Any]:
        """The ride as one row of model input (no ride_id)."""
        return self.model_dump(include=set(RIDE_COLUMNS))


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
            "PU_DO": np.char.add(np.char.add(pu.astype(str), "_"), do.astype(str)).astype(object),
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


class CoarseEstimator:
    """The backend's instant estimate: per pickup hour, minutes = intercept + slope * miles.

    Fitted on real trips by ``training.coarse``; a JSON file of 48 numbers, so the
    backend answers without loading the full model.
    """

    def __init__(self, intercepts: list[float], slopes: list[float], max_distance: float, trained_on: str = ""):
        if len(intercepts) != 24 or len(slopes) != 24:
            raise ValueError("a coarse estimator needs 24 hourly intercepts and slopes")
        self.intercepts = np.asarray(intercepts, dtype=float)
        self.slopes = np.asarray(slopes, dtype=float)
        self.max_distance = float(max_distance)
        self.trained_on = trained_on

    def predict(self, rides: pd.DataFrame) -> np.ndarray:
        hours = pd.to_datetime(rides["datetime"], format="ISO8601").dt.hour.to_numpy()
        miles = np.clip(rides["trip_distance"].to_numpy(dtype=float), 0, self.max_distance)
        return np.clip(self.intercepts[hours] + self.slopes[hours] * miles, 1.0, 60.0)

    def predict_ride(self, ride: Ride) -> float:
        return float(self.predict(rides_frame([ride]))[0])

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
