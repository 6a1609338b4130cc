"""Features are computed once: the same rides give the same features at training and at serving time."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

from data import load_trips
from ride_contract.coarse import CoarseEstimator
from ride_contract.features import FEATURE_COLUMNS, ride_feature_matrix
from ride_contract.ride import RIDE_COLUMNS, InvalidRide, Ride, parse_ride
from ride_contract.sklearn_features import ride_features, rides_frame


@pytest.fixture(scope="module")
def real_trips() -> pd.DataFrame:
    trips = load_trips(DATA / "green_tripdata_2021-02.parquet")
    return trips[trips["trip_distance"] > 0].sample(500, random_state=3).reset_index(drop=True)


def test_training_and_serving_features_are_identical(real_trips):
    # Training: the loader's frame, datetimes as timestamps, through the pipeline's pandas step.
    at_training = ride_features(real_trips[RIDE_COLUMNS])
    # Serving: the same rides as JSON messages (what the backend publishes), validated, as the function computes them.
    messages = [
        json.dumps({**r, "datetime": r["datetime"].strftime("%Y-%m-%d %H:%M:%S")})
        for r in real_trips[RIDE_COLUMNS].to_dict("records")
    ]
    rides = [Ride.model_validate_json(m) for m in messages]
    np.testing.assert_array_equal(at_training.to_numpy(dtype=np.float64), ride_feature_matrix(rides))
    assert list(at_training.columns) == FEATURE_COLUMNS
    # And pandas' own calendar agrees with the feature function's.
    pickup = real_trips["datetime"]
    np.testing.assert_array_equal(at_training["pickup_weekday"], pickup.dt.day_of_week)
    np.testing.assert_array_equal(at_training["pickup_hour"], pickup.dt.hour + pickup.dt.minute / 60)


def test_feature_values_for_one_ride():
    ride = Ride.model_validate({"datetime": "2022-06-23 11:36:42", "PULocationID": 34, "DOLocationID": 56, "trip_distance": 12})
    row = dict(zip(FEATURE_COLUMNS, ride_feature_matrix([ride])[0], strict=True))
    assert row == ride_features(rides_frame([ride])).iloc[0].to_dict()
    assert row == {
        "PULocationID": 34,
        "DOLocationID": 56,
        "PU_DO": 34056,
        "trip_distance": 12.0,
        "pickup_hour": pytest.approx(11.6),
        "pickup_weekday": 3,  # a Thursday
    }


def test_logged_pipeline_predicts_the_same_for_frames_and_ride_dicts(local_model, real_trips, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # our own model

    result, settings = local_model
    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.sklearn.load_model(result.model_uri)
    from_frame = model.predict(real_trips[RIDE_COLUMNS])
    from_dicts = model.predict(
        rides_frame({**r, "datetime": str(r["datetime"])} for r in real_trips[RIDE_COLUMNS].to_dict("records"))
    )
    np.testing.assert_allclose(from_frame, from_dicts)


def test_aware_datetimes_become_nyc_local_time():
    ride = {"datetime": "2022-06-23T15:36:42+00:00", "PULocationID": 1, "DOLocationID": 2, "trip_distance": 1}
    assert str(Ride.model_validate(ride).datetime) == "2022-06-23 11:36:42"
    # The pipeline's own step reads an aware time the same way, so a frame of them scores as the rides would.
    assert ride_features(pd.DataFrame([ride]))["pickup_hour"].iloc[0] == pytest.approx(11.6)


def test_weekdays_before_1970_are_counted_from_the_right_day():
    # The feature function counts days from 1970-01-01 (a Thursday); TLC files hold pickups from 2009 and earlier.
    pickups = pd.Series(pd.to_datetime(["1969-12-31 23:59", "1960-02-29 00:00", "2009-01-01 00:00", "2024-12-30 07:30"]))
    frame = pd.DataFrame({"datetime": pickups, "PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0})
    np.testing.assert_array_equal(ride_features(frame)["pickup_weekday"], pickups.dt.day_of_week)


def test_parse_ride_names_every_bad_field():
    with pytest.raises(InvalidRide) as error:
        parse_ride({"datetime": "soon", "PULocationID": 0, "DOLocationID": 300, "trip_distance": 0, "tip": 1})
    assert set(error.value.fields) == {"datetime", "PULocationID", "DOLocationID", "trip_distance", "tip"}


def test_coarse_estimator_round_trips_and_follows_its_hourly_lines():
    estimator = CoarseEstimator(list(range(24)), [2.0] * 24, max_distance=30)
    again = CoarseEstimator.from_dict(json.loads(json.dumps(estimator.to_dict())))
    ride = Ride.model_validate({"datetime": "2021-01-01 05:10:00", "PULocationID": 1, "DOLocationID": 2, "trip_distance": 4})
    assert again.predict_ride(ride) == 5 + 2 * 4
    assert again.predict_ride(ride.model_copy(update={"trip_distance": 100.0})) == 60  # capped distance, clipped minutes
    with pytest.raises(ValueError, match="24 hourly"):
        CoarseEstimator([1.0], [1.0], 30)


def test_a_rides_fingerprint_is_pinned():
    """The backend computes it with its own ride_contract, the function with the model's copy: any change
    to its canonical form would turn every result of an already deployed model into a mismatch."""
    from ride_contract.ride import Ride

    ride = {"datetime": "2022-06-23 11:36:42", "PULocationID": 34, "DOLocationID": 56, "trip_distance": 12}
    assert Ride.model_validate(ride).fingerprint() == "bae18b3d73261312"
    # Neither the ride_id nor how the same values are written changes it.
    same = {**ride, "ride_id": "app-1", "datetime": "2022-06-23T11:36:42-04:00", "trip_distance": 12.0}
    assert Ride.model_validate(same).fingerprint() == "bae18b3d73261312"
    assert Ride.model_validate({**ride, "trip_distance": 12.01}).fingerprint() != "bae18b3d73261312"
