"""flows.job, the flows' entry point as Cloud Run jobs: the MLflow ID token, the day of prediction lines the
drift report reads, the reference month, and the structured lines the dashboard's metrics read."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest

from flows import job
from flows.settings import JobSettings
from training.settings import Settings


def test_the_mlflow_server_gets_an_id_token_for_its_own_url(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    asked = []
    job.mlflow_token("", fetch=asked.append)  # a server without Cloud Run IAM: no token, nothing fetched
    assert asked == [] and "MLFLOW_TRACKING_TOKEN" not in os.environ
    job.mlflow_token("https://ridestream-prod-mlflow-abc-ew.a.run.app", fetch=lambda audience: f"token-for:{audience}")
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "token-for:https://ridestream-prod-mlflow-abc-ew.a.run.app"


def test_without_a_metadata_server_the_token_fetch_fails_loudly(monkeypatch):
    """On Cloud Run the job's identity answers; anywhere else (no ADC), the job stops before any flow runs."""
    import google.auth.exceptions

    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    monkeypatch.setenv("CLOUDSDK_CONFIG", "/nonexistent")
    with pytest.raises(google.auth.exceptions.DefaultCredentialsError):
        job.mlflow_token("https://ridestream-prod-mlflow-abc-ew.a.run.app")


def test_the_drift_report_reads_one_day_of_the_sinks_folders():
    day = job.prediction_log_day("gs://p-ridestream-prod-prediction-logs", dt.date(2026, 12, 6))
    assert day == "gs://p-ridestream-prod-prediction-logs/run.googleapis.com/stdout/2026/12/06/"
    with pytest.raises(ValueError, match="PREDICTION_LOGS must be the sink's gs:// bucket"):
        job.prediction_log_day("", dt.date(2026, 12, 6))


def test_an_unknown_job_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        job.main(["retrain"])
    assert "invalid choice: 'retrain'" in capsys.readouterr().err


def test_the_reference_month_is_the_month_production_was_trained_on(tmp_path):
    from mlflow import MlflowClient

    settings = Settings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(settings.tracking_uri)
    run = client.create_run(client.create_experiment("ride-duration", artifact_location=str(tmp_path / "artifacts")))
    client.create_registered_model(settings.model_name)
    version = client.create_model_version(settings.model_name, f"{run.info.artifact_uri}/model", run.info.run_id)
    client.set_registered_model_alias(settings.model_name, "production", version.version)
    with pytest.raises(ValueError, match=r"ride-duration v1 \(production\) has no train_months tag: set REFERENCE_MONTH"):
        job.reference_month(JobSettings(), settings)
    client.set_model_version_tag(settings.model_name, version.version, "train_months", "2026-08,2026-09")
    assert job.reference_month(JobSettings(), settings) == "2026-08"
    assert job.reference_month(JobSettings(reference_month="2021-01"), settings) == "2021-01"


def test_each_version_of_the_last_complete_window_gets_one_json_line(capsys):
    summary = {
        "complete_window_start": dt.datetime(2026, 12, 7, 5, tzinfo=dt.UTC).timestamp(),
        "complete_window": {
            "final v3": {"rides": 412, "rmse": 5.3, "mae": 3.9, "bias": 0.4, "ranged": 400, "coverage": 0.79, "mean_width": 9.1},
            "shadow v4": {"rides": 398, "rmse": 4.9, "mae": 3.6, "bias": 0.1},
        },
    }
    job._write(job.quality_lines(summary))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        {
            "severity": "INFO",
            "message": job.LIVE_QUALITY_LINE,
            "model_version": "3",
            "answer": "final",
            "window_start": "2026-12-07T05:00:00+00:00",
            "rides": 412,
            "rmse": 5.3,
            "mae": 3.9,
            "bias": 0.4,
            "interval_coverage": 0.79,
        },
        {
            "severity": "INFO",
            "message": job.LIVE_QUALITY_LINE,
            "model_version": "4",
            "answer": "shadow",
            "window_start": "2026-12-07T05:00:00+00:00",
            "rides": 398,
            "rmse": 4.9,
            "mae": 3.6,
            "bias": 0.1,
        },
    ]
    assert job.quality_lines({"complete_window": {}}) == []  # no completed ride in the last hour: no point
