"""The ride request schema and its validation. Only pydantic: the backend image stays small."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# TLC zone IDs: 1..263 are zones, 264/265 are "Unknown"/"Outside of NYC".
MIN_LOCATION_ID = 1
MAX_LOCATION_ID = 265
# Longest plausible NYC taxi ride; larger values in TLC files are meter glitches.
MAX_TRIP_DISTANCE_MILES = 200.0
# The answers a rider may be given, in minutes: the training target's range (data.loader keeps
# only trips of 1-60 min), so no model has learnt anything outside it. The serving function
# clips every prediction into it and the result message refuses anything outside it.
MIN_DURATION_MINUTES = 1.0
MAX_DURATION_MINUTES = 60.0
NYC = ZoneInfo("America/New_York")

RIDE_COLUMNS = ["datetime", "PULocationID", "DOLocationID", "trip_distance"]

LocationId = Annotated[int, Field(ge=MIN_LOCATION_ID, le=MAX_LOCATION_ID, strict=True)]


def nyc_local_datetime(value: Any) -> dt.datetime:
    """A timestamp as TLC keeps them: naive NYC local time (an aware one is converted to it)."""
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
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(NYC).replace(tzinfo=None)
    return parsed


# A ride_id a client may choose: short, and safe in a URL, a log line and a Redis key.
RIDE_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


class Ride(BaseModel):
    """A ride request: only what is known when the ride is booked."""

    # Unknown fields are rejected rather than ignored: a typo such as
    # "trip_distanse" must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    ride_id: Annotated[str, Field(min_length=1, max_length=64, pattern=RIDE_ID_PATTERN)] | None = None
    datetime: dt.datetime = Field(description='Pickup time, e.g. "2022-06-23 11:36:42" (NYC local time)')
    PULocationID: LocationId
    DOLocationID: LocationId
    trip_distance: Annotated[float, Field(gt=0, le=MAX_TRIP_DISTANCE_MILES, strict=True)]

    @field_validator("datetime", mode="before")
    @classmethod
    def _datetime_from_text(cls, value: Any) -> dt.datetime:
        return nyc_local_datetime(value)

    def model_input(self) -> dict[str, Any]:
        """The ride as one row of model input (no ride_id)."""
        return self.model_dump(include=set(RIDE_COLUMNS))

    def fingerprint(self) -> str:
        """What the ride is, without its id: two rides answer alike exactly when their fingerprints match.

        A ride_id can be reused for another ride (a client bug, an expired record); the
        function and the backend key on (ride_id, fingerprint), so one ride's answer never
        reaches another."""
        canonical = self.model_dump_json(include=set(RIDE_COLUMNS))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class InvalidFields(ValueError):
    """A payload the contract refuses; ``fields`` maps each bad field to what is wrong with it."""

    def __init__(self, fields: dict[str, str]):
        self.fields = fields
        super().__init__("; ".join(f"{name}: {problem}" for name, problem in fields.items()))

    @classmethod
    def of(cls, exc: ValidationError, whole: str) -> InvalidFields:
        """Every error pydantic found, by field (``whole``: the name for an error of the payload as a whole)."""
        return cls({".".join(map(str, e["loc"])) or whole: e["msg"] for e in exc.errors()})


class InvalidRide(InvalidFields):
    """A payload that is not a valid ride."""


def parse_ride(payload: Any) -> Ride:
    """Validate a decoded JSON payload as a ride, or raise InvalidRide naming every bad field."""
    if not isinstance(payload, Mapping):
        raise InvalidRide({"ride": f"must be a JSON object, got {type(payload).__name__}"})
    try:
        return Ride.model_validate(payload)
    except ValidationError as exc:
        raise InvalidRide.of(exc, "ride") from exc
