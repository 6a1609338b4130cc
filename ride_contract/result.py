"""The result message: what the serving function publishes to BACKEND_PULL_STREAM, one per ride."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ride_contract.ride import MAX_DURATION_MINUTES, MIN_DURATION_MINUTES

Minutes = Annotated[float, Field(ge=MIN_DURATION_MINUTES, le=MAX_DURATION_MINUTES)]


def served_minutes(predicted: Any) -> np.ndarray:
    """What riders are told for raw model predictions: clipped into the duration bounds, to 0.01 min.

    Training scores its models on these (its metrics are of answers as served), and the
    serving function answers with them: one definition, shipped inside every model."""
    return np.round(np.clip(np.asarray(predicted, dtype=np.float64), MIN_DURATION_MINUTES, MAX_DURATION_MINUTES), 2)


def served_range(final: Any, low: Any, high: Any) -> tuple[np.ndarray, np.ndarray]:
    """The range riders are told for raw bounds: each served as minutes are, widened to hold the final answer.

    The quantile models are fitted apart from the point model, so a ride's final can fall just
    outside its range; a range that does not contain the answer beside it would contradict it.
    Training's coverage figures are of ranges as served."""
    final = served_minutes(final)
    return np.minimum(served_minutes(low), final), np.maximum(served_minutes(high), final)


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
    # The ride's range (the model's calibrated 10th to 90th percentile: about 4 rides in 5 end within
    # it), holding duration_final. None from a model logged without one.
    duration_low: Minutes | None = None
    duration_high: Minutes | None = None

    @model_validator(mode="after")
    def _range_holds_the_answer(self) -> RideResult:
        if (self.duration_low is None) != (self.duration_high is None):
            raise ValueError("give both duration_low and duration_high, or neither")
        if self.duration_low is not None and not self.duration_low <= self.duration_final <= self.duration_high:
            raise ValueError(
                f"the range {self.duration_low}-{self.duration_high} min does not hold duration_final {self.duration_final}"
            )
        return self

    @classmethod
    def answer(
        cls,
        ride_id: str,
        predicted: float,
        ride_fingerprint: str,
        interval: tuple[float, float] | None = None,
        **model: Any,
    ) -> RideResult:
        """The result for a raw prediction: served_minutes of it, marked ``clipped`` when it was out of bounds;
        with ``interval`` (raw low and high bounds), the range as served (``served_range``)."""
        duration = float(served_minutes(predicted))
        clipped = not MIN_DURATION_MINUTES <= predicted <= MAX_DURATION_MINUTES
        if interval is not None:
            low, high = served_range(predicted, *interval)
            model.update(duration_low=float(low), duration_high=float(high))
        return cls(ride_id=ride_id, duration_final=duration, ride_fingerprint=ride_fingerprint, clipped=clipped, **model)

    def to_message(self) -> bytes:
        return self.model_dump_json().encode()
