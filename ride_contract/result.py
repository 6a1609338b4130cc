"""The result message: what the serving function publishes to BACKEND_PULL_STREAM, one per ride."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RideResult(BaseModel):
    """The accurate duration of one ride and the model that predicted it."""

    # Extra fields are ignored, not rejected: a newer function may add some, and a result
    # in flight must still reach the rider while the backend is rolled out.
    model_config = ConfigDict(extra="ignore", frozen=True)

    ride_id: str = Field(min_length=1)
    duration_final: float
    model_run_id: str
    model_version: str = ""
    model_id: str = ""
    # Ride.fingerprint() of the ride answered: the backend stores a result only on the ride it was asked for.
    ride_fingerprint: str = ""

    def to_message(self) -> bytes:
        return self.model_dump_json().encode()
