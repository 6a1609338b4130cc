"""Monitoring configuration, read from the environment in this one place (training's is ``training.settings``)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class MonitoringSettings:
    # Where the function's prediction logs land (the Cloud Logging sink's gs:// bucket, infra/).
    # Empty: no daily drift report is scheduled.
    prediction_logs: str = ""

    @classmethod
    def from_env(cls) -> MonitoringSettings:
        return cls(prediction_logs=os.environ.get("PREDICTION_LOGS", "").strip())
