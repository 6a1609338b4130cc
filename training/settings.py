"""Training configuration: every environment variable training reads, in one place (``Settings.from_env``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
# Embedded default: a sqlite store beside the project; production points MLFLOW_TRACKING_URI
# at an MLflow server backed by PostgreSQL (Cloud SQL).
DEFAULT_TRACKING_URI = f"sqlite:///{PROJECT_DIR / 'mlflow.db'}"
DEFAULT_DATA_BASE = str(PROJECT_DIR / "data")


@dataclass(frozen=True)
class Settings:
    tracking_uri: str = DEFAULT_TRACKING_URI
    # The experiment new runs go into (created on first use); under `mlflow run`, the run's own experiment instead.
    experiment_name: str = "ride-duration"
    # Where a new experiment stores its artifacts, e.g. gs://ridestream-models. Empty: the server's default.
    artifact_root: str = ""
    # The registered model training adds versions to and the flows promote; the rollout service reads the same
    # model's aliases under another name, MODEL_NAME: set both alike.
    model_name: str = "ride-duration"
    # A local folder, a gs:// prefix or the TLC download URL holding `<color>_tripdata_<YYYY-MM>.parquet`.
    data_base: str = DEFAULT_DATA_BASE
    # Rows per split for a quick run (`python -m training.train` and `mlflow run .`); None (unset or 0): every row.
    # From the environment, not an MLproject parameter: `mlflow run` logs its parameters as the run's,
    # and a parameter training logs again with another value ("all") is refused.
    train_sample: int | None = None

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        return cls(
            tracking_uri=env("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
            experiment_name=env("MLFLOW_EXPERIMENT_NAME") or "ride-duration",
            artifact_root=env("MLFLOW_ARTIFACT_ROOT", ""),
            model_name=env("REGISTERED_MODEL_NAME") or "ride-duration",
            data_base=env("TRIP_DATA_BASE") or DEFAULT_DATA_BASE,
            train_sample=int(env("TRAIN_SAMPLE") or 0) or None,
        )


def configure_mlflow(settings: Settings) -> str:
    """Point MLflow at the tracking store and experiment; returns the experiment id.

    Under ``mlflow run`` the run already exists (MLFLOW_RUN_ID): training logs into that run
    and its experiment, whatever ``--experiment-name`` was or was not given. (MLFLOW_EXPERIMENT_ID
    is no guide: ``mlflow.set_experiment`` leaves it behind in the process's environment.)"""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(settings.tracking_uri)
    if os.environ.get("MLFLOW_RUN_ID"):
        experiment_id = mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
        mlflow.set_experiment(experiment_id=experiment_id)
        return experiment_id
    experiment = mlflow.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        try:
            experiment_id = mlflow.create_experiment(settings.experiment_name, artifact_location=settings.artifact_root or None)
        except MlflowException:  # created meanwhile by another process (flows start several): use that one
            experiment = mlflow.get_experiment_by_name(settings.experiment_name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
