"""Prefect flows on the real 2021 data: end to end, the promotion gate both ways, batch scoring."""

from __future__ import annotations

import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA

from data import TripDataError, load_trips
from flows.scoring_flow import scoring_flow
from flows.training_flow import training_flow
from ride_contract.ride import RIDE_COLUMNS
from training import registry
from training.settings import Settings
from training.train import score

SAMPLE = 15_000


@pytest.fixture
def store(tmp_path, monkeypatch, prefect_harness):
    """A fresh MLflow store per test; the flows read it from the environment like in production."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("TRIP_DATA_BASE", str(DATA))
    return Settings.from_env()


def aliases(settings: Settings) -> dict[str, str | None]:
    return {a: registry.current_version(a, settings) for a in (registry.PRODUCTION, registry.CHALLENGER, registry.PREVIOUS)}


def test_first_model_is_promoted_and_a_worse_one_stays_challenger(store):
    first = training_flow(trials=1, sample=SAMPLE)
    assert first["promoted"] and first["version"] == "1" and first["reason"] == "no production model yet"
    assert aliases(store) == {"production": "1", "challenger": None, "previous": None}

    worse = training_flow(model_family="linear", trials=1, sample=SAMPLE)
    assert not worse["promoted"] and worse["alias"] == "challenger"
    assert "does not beat production v1" in worse["reason"]
    assert aliases(store) == {"production": "1", "challenger": "2", "previous": None}

    # Both were re-scored on the same test rows: recompute the numbers the gate compared.
    test = load_trips(DATA / "green_tripdata_2021-03.parquet").sample(SAMPLE, random_state=0).reset_index(drop=True)
    assert worse["production_rmse"] == pytest.approx(
        score(registry.load_registered_model("models:/ride-duration/1"), test)["rmse"]
    )
    assert worse["candidate_rmse"] == pytest.approx(
        score(registry.load_registered_model("models:/ride-duration/2"), test)["rmse"]
    )
    assert worse["candidate_rmse"] > worse["production_rmse"]


def test_a_better_model_replaces_production(store):
    weak = training_flow(model_family="linear", trials=1, sample=SAMPLE)
    assert weak["promoted"]
    better = training_flow(trials=1, sample=SAMPLE)
    assert better["promoted"] and better["candidate_rmse"] < better["production_rmse"]
    assert "beats production v1" in better["reason"]
    assert aliases(store) == {"production": "2", "challenger": None, "previous": "1"}
    assert registry.resolve("production", store).run_id == better["run_id"]


def test_min_improvement_keeps_an_equal_model_out(store):
    training_flow(trials=1, sample=SAMPLE)
    same = training_flow(trials=1, sample=SAMPLE, min_improvement=0.5)
    assert not same["promoted"] and aliases(store)["production"] == "1"


def test_latest_uses_the_newest_three_consecutive_months(store, tmp_path, monkeypatch):
    data = tmp_path / "tlc"
    data.mkdir()
    for month in ("2021-01", "2021-02", "2021-03"):
        shutil.copy(DATA / f"green_tripdata_{month}.parquet", data)
    monkeypatch.setenv("TRIP_DATA_BASE", str(data))
    result = training_flow(latest=True, trials=1, sample=SAMPLE)
    from mlflow import MlflowClient

    params = MlflowClient(store.tracking_uri).get_run(result["run_id"]).data.params
    assert (params["train_months"], params["val_months"], params["test_months"]) == ("2021-01", "2021-02", "2021-03")


def test_broken_data_stops_the_flow_before_training(store, tmp_path, monkeypatch):
    data = tmp_path / "tlc"
    data.mkdir()
    for month in ("2021-01", "2021-02", "2021-03"):
        trips = pq.read_table(DATA / f"green_tripdata_{month}.parquet").slice(0, 50)  # a truncated download
        pq.write_table(trips, data / f"green_tripdata_{month}.parquet")
    monkeypatch.setenv("TRIP_DATA_BASE", str(data))
    with pytest.raises(TripDataError, match=r"data validation failed: train: only \d+ rows"):
        training_flow(trials=1)
    assert aliases(store)["production"] is None


def test_batch_scoring_writes_one_prediction_per_filtered_ride(store, tmp_path):
    training_flow(trials=1, sample=SAMPLE)
    output = tmp_path / "out" / "march.parquet"
    summary = scoring_flow(month="2021-03", output=str(output))
    predictions = pd.read_parquet(output)
    assert summary["rows"] == len(predictions) == 80_372  # March after the loader's filters
    assert predictions["ride_id"].is_unique and predictions["ride_id"].iloc[0] == "green-2021-03-0"
    assert set(predictions["model_version"]) == {"1"}
    assert {"duration_actual", "duration_predicted", *RIDE_COLUMNS} <= set(predictions.columns)
    assert summary["rmse"] < 6.0


@pytest.mark.integration
def test_batch_scoring_to_the_bucket(store, emulators):
    from google.cloud import storage

    training_flow(trials=1, sample=SAMPLE)
    output = f"gs://{emulators.bucket}/predictions/green_2021-02.parquet"
    assert scoring_flow(month="2021-02", output=output)["rows"] == 61_920
    blob = storage.Client().bucket(emulators.bucket).blob("predictions/green_2021-02.parquet").download_as_bytes()
    assert pq.read_table(pa.BufferReader(blob)).num_rows == 61_920


def test_schedules_train_and_score_monthly_and_monitor_daily_when_logs_are_configured(monkeypatch, prefect_harness):
    from flows.serve import deployments

    monkeypatch.delenv("PREDICTION_LOGS", raising=False)
    monkeypatch.delenv("OUTCOMES_URI", raising=False)
    assert [d.name for d in deployments()] == ["monthly-training", "monthly-scoring"]
    monkeypatch.setenv("PREDICTION_LOGS", "gs://bucket/prediction-logs")
    monkeypatch.setenv("OUTCOMES_URI", "gs://bucket/outcomes/")
    planned = {d.name: d for d in deployments()}
    assert planned["hourly-live-quality"].parameters == {"outcomes": "gs://bucket/outcomes/", "hours": 24}
    assert planned["hourly-live-quality"].schedules[0].schedule.cron == "5 * * * *"
    assert planned["monthly-training"].parameters == {"latest": True}
    assert planned["monthly-training"].schedules[0].schedule.cron == "0 6 3 * *"
    assert {d.schedules[0].schedule.timezone for d in planned.values()} == {"America/New_York"}
    assert planned["daily-monitoring"].parameters == {"predictions": "gs://bucket/prediction-logs"}


def test_prefect_yaml_matches_the_lock_the_schedules_and_uses_worker_pools():
    import re

    import yaml
    from conftest import REPO

    from flows.serve import DAILY_MONITORING, HOURLY_LIVE_QUALITY, MONTHLY_SCORING, MONTHLY_TRAINING, TIMEZONE

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [locked] = re.findall(r"^prefect==(\S+)$", (REPO / "requirements.lock").read_text(), re.M)
    assert spec["prefect-version"] == locked
    schedules = {d["name"]: d["schedules"][0] for d in spec["deployments"]}
    assert schedules == {
        "monthly-training": {"cron": MONTHLY_TRAINING, "timezone": TIMEZONE},
        "monthly-scoring": {"cron": MONTHLY_SCORING, "timezone": TIMEZONE},
        "daily-monitoring": {"cron": DAILY_MONITORING, "timezone": TIMEZONE},
        "hourly-live-quality": {"cron": HOURLY_LIVE_QUALITY, "timezone": TIMEZONE},
    }
    # The same parameters flows.serve gives them, from the same environment, and each entry point exists.
    parameters = {d["name"]: d.get("parameters", {}) for d in spec["deployments"]}
    assert parameters["daily-monitoring"] == {"predictions": "{{ $PREDICTION_LOGS }}"}
    assert parameters["hourly-live-quality"] == {"outcomes": "{{ $OUTCOMES_URI }}", "hours": 24}
    for deployment in spec["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        assert f"def {name}(" in (REPO / path).read_text(), deployment["entrypoint"]
    text = (REPO / "prefect.yaml").read_text()
    assert "--type cloud-run:push" not in text  # push pools need Prefect Cloud; this project runs its own server


def test_each_version_tells_its_story_in_the_registry_and_the_flow_run(mlflow_server, prefect_harness, monkeypatch):
    """Description and tags, read back through the MLflow REST API (what the UI shows), and the Prefect artifact."""
    import requests
    from prefect.artifacts import Artifact

    monkeypatch.setenv("TRIP_DATA_BASE", str(DATA))
    training_flow(trials=1, sample=5_000)
    worse = training_flow(model_family="linear", trials=1, sample=5_000)

    answer = requests.get(
        f"{mlflow_server}/api/2.0/mlflow/model-versions/get", params={"name": "ride-duration", "version": "2"}, timeout=30
    )
    version = answer.json()["model_version"]
    tags = {tag["key"]: tag["value"] for tag in version["tags"]}
    run = requests.get(f"{mlflow_server}/api/2.0/mlflow/runs/get", params={"run_id": worse["run_id"]}, timeout=30).json()
    metrics = {m["key"]: m["value"] for m in run["run"]["data"]["metrics"]}
    assert tags["decision"] == "challenger" and tags["decision_reason"] == worse["reason"]
    assert tags["train_months"] == "2021-01" and tags["test_months"] == "2021-03"
    assert tags["production_version_at_evaluation"] == "1"
    assert tags["production_test_rmse_at_evaluation"] == f"{worse['production_rmse']:.3f}"
    for key in ("val_rmse", "test_rmse", "coarse_test_rmse"):
        assert tags[key] == f"{metrics[key]:.3f}", key
    assert tags["baseline_test_rmse"] == "-"  # a linear candidate is its own baseline
    first = requests.get(
        f"{mlflow_server}/api/2.0/mlflow/model-versions/get", params={"name": "ride-duration", "version": "1"}, timeout=30
    ).json()["model_version"]
    assert float({t["key"]: t["value"] for t in first["tags"]}["baseline_test_rmse"]) > 0
    assert "promoted to **production**" in first["description"]
    description = version["description"]
    assert "kept as **challenger**" in description and worse["reason"] in description
    assert f"| production (v1) test RMSE, same rides, at evaluation | {worse['production_rmse']:.3f} | 2021-03 |" in description
    plots = f"{mlflow_server}/#/experiments/{run['run']['info']['experiment_id']}/runs/{worse['run_id']}/artifacts/plots/"
    assert f"({plots}test_predictions.png)" in description

    artifact = Artifact.get("model-decision")  # the latest flow run's
    assert artifact is not None and artifact.type == "markdown" and artifact.data == description
