"""A ride's outcome: how long it really took, as the rider app reports it when the ride ends.

The app sends either the drop-off time (NYC local time, as the pickup) or the minutes the ride
took. Either way the actual duration is judged against the ride it ends: after its pickup, and
within the bounds every model is trained and judged on (the 1-60 min of the training target),
so a live RMSE means what the test RMSE means.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ride_contract.ride import MAX_DURATION_MINUTES, MIN_DURATION_MINUTES, InvalidFields, nyc_local_datetime


class Outcome(BaseModel):
    """What the app reports: ``dropoff_datetime`` or ``duration_minutes``, exactly one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dropoff_datetime: dt.datetime | None = Field(default=None, description='e.g. "2022-06-23 11:58:10" (NYC local time)')
    duration_minutes: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    @field_validator("dropoff_datetime", mode="before")
    @classmethod
    def _datetime_from_text(cls, value: Any) -> dt.datetime | None:
        return None if value is None else nyc_local_datetime(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> Outcome:
        if (self.dropoff_datetime is None) == (self.duration_minutes is None):
            raise ValueError("give exactly one of dropoff_datetime and duration_minutes")
        return self


class InvalidOutcome(InvalidFields):
    """An outcome that is not valid for its ride."""


def actual_minutes(payload: Any, pickup: dt.datetime) -> float:
    """The ride's actual duration in minutes (to 0.01) from a decoded JSON outcome, or InvalidOutcome."""
    if not isinstance(payload, Mapping):
        raise InvalidOutcome({"outcome": f"must be a JSON object, got {type(payload).__name__}"})
    try:
        outcome = Outcome.model_validate(payload)
    except ValidationError as exc:
        raise InvalidOutcome.of(exc, "outcome") from exc
    if outcome.dropoff_datetime is not None:
        field = "dropoff_datetime"
        if outcome.dropoff_datetime <= pickup:
            raise InvalidOutcome({field: f"{outcome.dropoff_datetime} is not after the pickup at {pickup}"})
        minutes = (outcome.dropoff_datetime - pickup).total_seconds() / 60
    else:
        field, minutes = "duration_minutes", float(outcome.duration_minutes)
    if not MIN_DURATION_MINUTES <= minutes <= MAX_DURATION_MINUTES:
        raise InvalidOutcome(
            {
                field: f"a {minutes:.2f} min ride is outside the {MIN_DURATION_MINUTES:g}-{MAX_DURATION_MINUTES:g} min "
                "every model is trained and judged on"
            }
        )
    return round(minutes, 2)


class ShadowAnswer(BaseModel):
    model_version: str
    duration_final: float
    model_run_id: str = ""


class CompletedRide(BaseModel):
    """A ride with every answer it got and how long it really took: the outcomes topic's message, which
    the monitoring flow reads (from a Cloud Storage subscription on Google Cloud, the stack's sink locally)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    ride_id: str
    fingerprint: str
    ride: dict[str, Any]  # the ride as it was asked (ride_contract.ride.RIDE_COLUMNS)
    requested_at: float
    duration_coarse: float
    duration_final: float | None = None  # None: the ride never got its final (it failed)
    model_version: str = ""
    model_run_id: str = ""
    # The final's range, where the model gives one.
    duration_low: float | None = None
    duration_high: float | None = None
    shadow: list[ShadowAnswer] = []
    actual_minutes: float
    outcome_at: float

    def to_message(self) -> bytes:
        return self.model_dump_json().encode()


def completed_ride(record: Mapping[str, Any]) -> CompletedRide:
    """The completed ride from the backend's record of it (its final only if it was answered)."""
    done = record.get("status") == "done"
    shadows = [ShadowAnswer(model_version=v, **s) for v, s in (record.get("shadow") or {}).items()]
    return CompletedRide.model_validate(
        {
            **{k: v for k, v in record.items() if k not in ("shadow", "duration_final", "duration_low", "duration_high")},
            **({k: record.get(k) for k in ("duration_final", "duration_low", "duration_high")} if done else {}),
            "shadow": shadows,
        }
    )
