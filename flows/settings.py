"""Monitoring configuration, read from the environment in this one place (training's is ``training.settings``)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class MonitoringSettings:
    # Where the function's prediction logs land (the Cloud Logging sink's gs:// bucket, infra/).
    # Empty: no daily drift report is scheduled.
    prediction_logs: str = ""
    # Where completed rides land (the outcomes topic's Cloud Storage subscription, infra/; the stack's
    # sink locally). Empty: no hourly live-quality run is scheduled.
    outcomes_uri: str = ""
    live_window_minutes: float = 60.0  # one point of live quality per window
    # A window's point is logged once the window has ended this long ago: its completed rides are filed by
    # then (the Cloud Storage subscription writes an object at least every max_duration, 300 s in infra/).
    live_window_settle_minutes: float = 5.0
    # Production is degraded when, over a window of at least alert_min_rides completed rides, its live
    # RMSE is above its test RMSE by more than alert_rmse_increase (0.2: 20 %).
    alert_min_rides: int = 200
    alert_rmse_increase: float = 0.2

    @classmethod
    def from_env(cls) -> MonitoringSettings:
        env = os.environ.get
        return cls(
            prediction_logs=env("PREDICTION_LOGS", "").strip(),
            outcomes_uri=env("OUTCOMES_URI", "").strip(),
            live_window_minutes=float(env("LIVE_WINDOW_MINUTES", "60")),
            live_window_settle_minutes=float(env("LIVE_WINDOW_SETTLE_MINUTES", "5")),
            alert_min_rides=int(env("ALERT_MIN_RIDES", "200")),
            alert_rmse_increase=float(env("ALERT_RMSE_INCREASE", "0.2")),
        )


@dataclass(frozen=True)
class JobSettings:
    """What the flows read as Cloud Run jobs (``python -m flows.job``, infra/flows.tf), beside training's
    settings and the monitoring settings above."""

    # The MLflow server's URL when it sits behind Cloud Run IAM: the job fetches a Google ID token for it
    # (from the job's own identity) and sends it as MLFLOW_TRACKING_TOKEN. Empty: no token (a local server).
    mlflow_id_token_audience: str = ""
    # Live quality: the completed rides of the last H hours (a window already logged is not logged again).
    live_quality_hours: float = 24.0
    # Monitoring: the month the drift is measured against. Empty: the first month production was trained on
    # (its registry tag train_months, written by the training flow).
    reference_month: str = ""
    # Training: hyper-parameter trials, and how much better than production a candidate must be (0.01: 1 %).
    training_trials: int = 3
    min_improvement: float = 0.0

    @classmethod
    def from_env(cls) -> JobSettings:
        env = os.environ.get
        return cls(
            mlflow_id_token_audience=env("MLFLOW_ID_TOKEN_AUDIENCE", "").strip(),
            live_quality_hours=float(env("LIVE_QUALITY_HOURS", "24")),
            reference_month=env("REFERENCE_MONTH", "").strip(),
            training_trials=int(env("TRAINING_TRIALS", "3")),
            min_improvement=float(env("MIN_IMPROVEMENT", "0")),
        )
