"""Features are computed once: the same rides give the same features at training and at serving time."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

from data import load_trips
from ride_contract.coarse import CoarseEstimator
from ride_contract.features import FEATURE_COLUMNS, ride_features, rides_frame
from ride_contract.ride import RIDE_COLUMNS, InvalidRide, Ride, parse_ride


@pytest.fixture(scope="module")
def real_trips() -> pd.DataFrame:
    trips = load_trips(DATA / "green_tripdata_2021-02.parquet")
    return trips[trips["trip_distance"] > 0].sample(500, random_state=3).reset_index(drop=True)


def test_training_and_serving_features_are_identical(real_trips):
    # Training: the loader's frame, datetimes as timestamps.
    at_training = ride_features(real_trips[RIDE_COLUMNS])
    # Serving: the same rides as JSON messages (what the backend publishes), validated, then framed.
    messages = [
        json.dumps({**r, "datetime": r["datetime"].strftime("%Y-%m-%d %H:%M:%S")})
        for r in real_trips[RIDE_COLUMNS].to_dict("records")
    ]
    rides = [Ride.model_validate_json(m) for m in messages]
    at_serving = ride_features(rides_frame(rides))
    pd.testing.assert_frame_equal(at_training, at_serving)
    assert list(at_serving.columns) == FEATURE_COLUMNS


def test_feature_values_for_one_ride():
    ride = Ride.model_validate({"datetime": "2022-06-23 11:36:42", "PULocationID": 34, "DOLocationID": 56, "trip_distance": 12})
    row = ride_features(rides_frame([ride])).iloc[0].to_dict()
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
    ride = Ride.model_validate(
        {"datetime": "2022-06-23T15:36:42+00:00", "PULocationID": 1, "DOLocationID": 2, "trip_distance": 1}
    )
    assert str(ride.datetime) == "2022-06-23 11:36:42"


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
