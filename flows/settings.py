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
            alert_min_rides=int(env("ALERT_MIN_RIDES", "200")),
            alert_rmse_increase=float(env("ALERT_RMSE_INCREASE", "0.2")),
        )
