"""Serve the flows with their schedules from this process (the simplest Prefect deployment).

    prefect server start                 # terminal 1: API and UI on http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve    # terminal 2

Monthly: train on the newest three months available in TRIP_DATA_BASE (promotion
gated against production), then score the newest month. Daily, when PREDICTION_LOGS
names the bucket the function's prediction logs are exported to: the drift report. Hourly,
when OUTCOMES_URI names where completed rides land: live quality per model version.
For a work pool instead of this process (Cloud Run or Kubernetes via prefect-gcp),
see prefect.yaml.
"""

from __future__ import annotations

from prefect import serve
from prefect.schedules import Cron

from flows.live_quality_flow import live_quality_flow
from flows.monitoring_flow import monitoring_flow
from flows.scoring_flow import scoring_flow
from flows.settings import MonitoringSettings
from flows.training_flow import training_flow

# Every schedule in one explicit time zone, here and in prefect.yaml: the taxis' own.
TIMEZONE = "America/New_York"
# TLC publishes a month about two months later; retrain early each month.
MONTHLY_TRAINING = "0 6 3 * *"
MONTHLY_SCORING = "0 8 3 * *"
DAILY_MONITORING = "0 7 * * *"
HOURLY_LIVE_QUALITY = "5 * * * *"  # after the hour's last Cloud Storage object (at most 5 min) has landed


def deployments() -> list:
    deployments = [
        training_flow.to_deployment(
            name="monthly-training", schedule=Cron(MONTHLY_TRAINING, timezone=TIMEZONE), parameters={"latest": True}
        ),
        scoring_flow.to_deployment(name="monthly-scoring", schedule=Cron(MONTHLY_SCORING, timezone=TIMEZONE)),
    ]
    prediction_logs = MonitoringSettings.from_env().prediction_logs
    if prediction_logs:  # the bucket the Cloud Logging sink of infra/ writes to
        deployments.append(
            monitoring_flow.to_deployment(
                name="daily-monitoring",
                schedule=Cron(DAILY_MONITORING, timezone=TIMEZONE),
                parameters={"predictions": prediction_logs},
            )
        )
    outcomes_uri = MonitoringSettings.from_env().outcomes_uri
    if outcomes_uri:  # the bucket the outcomes topic's Cloud Storage subscription writes to (infra/)
        deployments.append(
            live_quality_flow.to_deployment(
                name="hourly-live-quality",
                schedule=Cron(HOURLY_LIVE_QUALITY, timezone=TIMEZONE),
                parameters={"outcomes": outcomes_uri, "hours": 24},
            )
        )
    return deployments


def main() -> None:
    serve(*deployments())


if __name__ == "__main__":
    main()
