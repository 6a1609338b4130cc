"""Champion vs challenger: rides matched to their actual durations, compared only where the two models differ."""

from __future__ import annotations

import pandas as pd
import pytest

from flows.challenger_flow import compare, with_actual_durations

TRIPS = pd.DataFrame(
    {
        "datetime": pd.to_datetime(["2021-03-01 08:00", "2021-03-01 09:00", "2021-03-01 10:00", "2021-03-01 10:00"]),
        "PULocationID": [1, 2, 3, 3],
        "DOLocationID": [4, 5, 6, 6],
        "trip_distance": [1.0, 2.0, 3.0, 3.0],
        "duration": [10.0, 20.0, 30.0, 31.0],  # the last two trips share every ride field: ambiguous
    }
)


def logged(predictions: list[float], version: str, rides: int = 3) -> pd.DataFrame:
    """Prediction records as read_prediction_log returns them (datetimes as the function logs them)."""
    frame = TRIPS.head(rides).drop(columns="duration").assign(datetime=lambda f: f["datetime"].dt.strftime("%Y-%m-%dT%H:%M:%S"))
    return frame.assign(prediction=predictions[:rides], model_version=version)


def test_each_ride_gets_its_actual_duration_and_ambiguous_trips_are_left_out():
    matched = with_actual_durations(logged([11, 19, 30], "1"), TRIPS)
    assert matched["duration"].tolist() == [10.0, 20.0]


def test_the_models_are_compared_on_the_same_rides():
    champion = with_actual_durations(logged([12, 22, 0], "1"), TRIPS)  # off by 2
    challenger = with_actual_durations(logged([11, 21, 0], "2"), TRIPS)  # off by 1
    result = compare(champion, challenger)
    assert result["rides"] == 2 and result["champion_rmse"] == pytest.approx(2) and result["challenger_rmse"] == pytest.approx(1)
    assert result["challenger_better"] is True


def test_rides_both_answered_with_the_same_version_are_no_comparison():
    same = with_actual_durations(logged([11, 21, 0], "2"), TRIPS)
    with pytest.raises(ValueError, match="different versions"):
        compare(same, same)
