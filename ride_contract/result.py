"""The result message: what the serving function publishes to BACKEND_PULL_STREAM, one per ride."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ride_contract.ride import MAX_DURATION_MINUTES, MIN_DURATION_MINUTES

Minutes = Annotated[float, Field(ge=MIN_DURATION_MINUTES, le=MAX_DURATION_MINUTES)]


def served_minutes(predicted: Any) -> np.ndarray:
    """What riders are told for raw model predictions: clipped into the duration bounds, to 0.01 min.

    Training scores its models on these (its metrics are of answers as served), and the
    serving function answers with them: one definition, shipped inside every model."""
    return np.round(np.clip(np.asarray(predicted, dtype=np.float64), MIN_DURATION_MINUTES, MAX_DURATION_MINUTES), 2)


class RideResult(BaseModel):
    """The accurate duration of one ride and the model that predicted it."""

    # Extra fields are ignored, not rejected: a newer function may add some, and a result
    # in flight must still reach the rider while the backend is rolled out.
    model_config = ConfigDict(extra="ignore", frozen=True)

    ride_id: str = Field(min_length=1)
    # Within the duration bounds, always: a result outside them is refused, never shown to a rider.
    duration_final: Minutes
    model_run_id: str
    model_version: str = ""
    model_id: str = ""
    # Ride.fingerprint() of the ride answered: the backend stores a result only on the ride it was
    # asked for, so a result that does not say which ride it answers is refused.
    ride_fingerprint: str = Field(min_length=1)
    # The model's own answer was outside the bounds and duration_final is the nearest bound.
    clipped: bool = False
    # The function's time from receiving the message to this answer (decode, validate, score), in ms:
    # the rollout's analysis watches a new version's p95 of it.
    answer_ms: float | None = None

    @classmethod
    def answer(cls, ride_id: str, predicted: float, ride_fingerprint: str, **model: Any) -> RideResult:
        """The result for a raw prediction: served_minutes of it, marked ``clipped`` when it was out of bounds."""
        duration = float(served_minutes(predicted))
        clipped = not MIN_DURATION_MINUTES <= predicted <= MAX_DURATION_MINUTES
        return cls(ride_id=ride_id, duration_final=duration, ride_fingerprint=ride_fingerprint, clipped=clipped, **model)

    def to_message(self) -> bytes:
        return self.model_dump_json().encode()
