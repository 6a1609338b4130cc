"""The flows as Cloud Run jobs: one image (flows/Dockerfile), one entry point, the job named by its argument.

    python -m flows.job training        # weekly: train on the newest three months, promote only if better
    python -m flows.job monitoring      # daily: yesterday's prediction lines against production's training month
    python -m flows.job live-quality    # hourly: live quality per version; exits 1 when production is degraded

Cloud Scheduler starts each job (infra/flows.tf); the job's arguments name the flow, and everything else comes
from the environment Terraform sets (training.settings, flows.settings). The flows run in this process, against
Prefect's ephemeral API: no Prefect server or worker is needed, and what they log reaches Cloud Logging as the
job's own log lines (docs/flows-in-the-cloud.md says which to look for).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from collections.abc import Callable

from flows.settings import JobSettings, MonitoringSettings
from training.settings import Settings

JOBS = ("training", "monitoring", "live-quality")
# The line per answering version that the live-quality job writes for Cloud Logging (jsonPayload.message):
# infra/observability.tf's log-based metrics chart its rmse and coverage per version.
LIVE_QUALITY_LINE = "live quality per version"
# Where the Cloud Logging sink files a day's prediction lines under its bucket: LOG_ID/YYYY/MM/DD/ (UTC), in
# hourly batches up to 3 hours late (cloud.google.com/logging/docs/export/storage). The function writes them on
# stdout, Cloud Run's log run.googleapis.com/stdout. The daily run (07:00 New York) reads yesterday's UTC day,
# which is complete by then.
PREDICTION_LOG_ID = "run.googleapis.com/stdout"


def mlflow_token(audience: str, fetch: Callable[[str], str] | None = None) -> None:
    """Behind Cloud Run IAM the MLflow server takes a Google ID token for its URL: fetched from the job's own
    identity (the metadata server) and sent by MLflow's client as MLFLOW_TRACKING_TOKEN. A token lives an
    hour; every job here ends well inside its task timeout."""
    if not audience:
        return
    if fetch is None:
        import google.auth.transport.requests
        import google.oauth2.id_token

        def fetch(target: str) -> str:
            return google.oauth2.id_token.fetch_id_token(google.auth.transport.requests.Request(), target)

    os.environ["MLFLOW_TRACKING_TOKEN"] = fetch(audience)


def prediction_log_day(prediction_logs: str, day: dt.date) -> str:
    """The folder of one day's prediction lines under the sink's bucket (the monitoring flow reads a prefix)."""
    if not prediction_logs.startswith("gs://"):
        raise ValueError(
            f"PREDICTION_LOGS must be the sink's gs:// bucket (infra output prediction_logs), got {prediction_logs!r}"
        )
    return f"{prediction_logs.rstrip('/')}/{PREDICTION_LOG_ID}/{day:%Y/%m/%d}/"


def reference_month(job: JobSettings, settings: Settings) -> str:
    """REFERENCE_MONTH, or the first month production was trained on (the training flow tags each version)."""
    if job.reference_month:
        return job.reference_month
    from mlflow import MlflowClient

    from training import registry

    version = MlflowClient(settings.tracking_uri).get_model_version_by_alias(settings.model_name, registry.PRODUCTION)
    months = version.tags.get("train_months", "")
    if not months:
        raise ValueError(f"{settings.model_name} v{version.version} (production) has no train_months tag: set REFERENCE_MONTH")
    return months.split(",")[0]


def quality_lines(summary: dict) -> list[dict]:
    """One structured line per version that answered in the last complete window: Cloud Logging reads a JSON
    line on stdout as the entry's jsonPayload (severity included)."""
    lines = []
    for model, figures in sorted(summary.get("complete_window", {}).items()):
        answer, _, version = model.partition(" v")  # "final v3" / "shadow v4"; the backend's coarse answer has none
        if not version:
            continue
        line = {
            "severity": "INFO",
            "message": LIVE_QUALITY_LINE,
            "model_version": version,
            "answer": answer,
            "window_start": dt.datetime.fromtimestamp(summary["complete_window_start"], dt.UTC).isoformat(),
            **{key: figures[key] for key in ("rides", "rmse", "mae", "bias") if key in figures},
        }
        if "coverage" in figures:
            line["interval_coverage"] = figures["coverage"]
        lines.append(line)
    return lines


def _write(lines: list[dict]) -> None:
    for line in lines:
        sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def run(job: str, now: dt.datetime | None = None) -> int:
    settings, monitoring, job_settings = Settings.from_env(), MonitoringSettings.from_env(), JobSettings.from_env()
    mlflow_token(job_settings.mlflow_id_token_audience)
    if job == "training":
        from flows.training_flow import training_flow

        result = training_flow(trials=job_settings.training_trials, min_improvement=job_settings.min_improvement, latest=True)
        print(json.dumps(result))
        return 0
    if job == "monitoring":
        from flows.monitoring_flow import monitoring_flow

        yesterday = (now or dt.datetime.now(dt.UTC)).date() - dt.timedelta(days=1)
        predictions = prediction_log_day(monitoring.prediction_logs, yesterday)
        # The report and its plot go to MLflow (log_to_mlflow); the job's own copy ends with its container.
        with tempfile.TemporaryDirectory(prefix="drift-") as output_dir:
            result = monitoring_flow(reference_month(job_settings, settings), None, predictions, output_dir=output_dir)
        print(json.dumps({key: result[key] for key in ("mlflow_run_id", "alert", "drift_share") if key in result}))
        return 0
    if job == "live-quality":
        from flows.live_quality_flow import QualityDegraded, live_quality_flow

        if not monitoring.outcomes_uri:
            raise ValueError("OUTCOMES_URI is not set: the live-quality job reads the completed rides there")
        try:
            summary = live_quality_flow(monitoring.outcomes_uri, job_settings.live_quality_hours)
        except QualityDegraded as degraded:
            # The flow has logged LIVE QUALITY DEGRADED (the alert counts that line); the figures still go out.
            _write(quality_lines(degraded.summary))
            return 1
        _write(quality_lines(summary))
        return 0
    raise ValueError(f"unknown job {job!r}: one of {', '.join(JOBS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=JOBS)
    return run(parser.parse_args(argv).job)


if __name__ == "__main__":
    raise SystemExit(main())
