"""Training configuration, read from the environment in this one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass(frozen=True)
class Settings:
    # Embedded default: a sqlite store beside the project; production points this at
    # an MLflow server backed by PostgreSQL (Cloud SQL).
    tracking_uri: str = field(default_factory=lambda: _env("MLFLOW_TRACKING_URI", f"sqlite:///{PROJECT_DIR / 'mlflow.db'}"))
    experiment_name: str = field(default_factory=lambda: _env("MLFLOW_EXPERIMENT_NAME", "ride-duration"))
    # Where a new experiment stores its artifacts, e.g. gs://ridestream-models. Empty: the server's default.
    artifact_root: str = field(default_factory=lambda: _env("MLFLOW_ARTIFACT_ROOT", ""))
    model_name: str = field(default_factory=lambda: _env("REGISTERED_MODEL_NAME", "ride-duration"))
    # A local folder, a gs:// prefix or the TLC download URL holding <color>_tripdata_<YYYY-MM>.parquet.
    data_base: str = field(default_factory=lambda: _env("TRIP_DATA_BASE", str(PROJECT_DIR / "data")))
    # Where the function's prediction logs land (the Cloud Logging sink's gs:// bucket), for monitoring.
    prediction_logs: str = field(default_factory=lambda: _env("PREDICTION_LOGS", ""))


def configure_mlflow(settings: Settings) -> str:
    """Point MLflow at the tracking store and experiment; returns the experiment id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    experiment = mlflow.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(settings.experiment_name, artifact_location=settings.artifact_root or None)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
