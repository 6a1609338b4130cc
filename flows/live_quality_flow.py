"""Prefect flow: every model judged on the rides whose actual duration came back, one point per window.

    python -m flows.live_quality_flow                         # OUTCOMES_URI, the last 24 hours
    python -m flows.live_quality_flow --outcomes gs://B/outcomes/ --hours 6

It reads the completed rides the outcomes topic filed (a Cloud Storage subscription on Google
Cloud, devstack.outcome_sink locally), computes each answering model's count, bias, MAE and
RMSE per window (ride_contract.quality, as the backends' live figures), and logs them as
``live_rmse``, ``live_mae``, ``live_bias`` and ``live_rides`` (and, for answers with a range,
``live_interval_coverage`` and ``live_interval_mean_width``) into each version's training run,
one point per CLOSED window (its step and timestamp), logged once: a window is closed once it has
ended and the rides completed in it have had time to be filed (LIVE_WINDOW_SETTLE_MINUTES), so a
point is never logged on part of its rides and left so. Each ride counts once (its first outcome:
Pub/Sub delivers at least once, and a backend may publish a retried outcome twice). The MLflow UI charts a version's live RMSE beside
its test RMSE, and its range's live coverage beside its test coverage. Production is degraded when
its live RMSE over a window of enough rides is above its test RMSE by more than the settings allow:
then the flow fails, loudly, with an artifact.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import ValidationError

from flows.monitoring_flow import _read_text
from flows.settings import MonitoringSettings
from ride_contract.outcome import CompletedRide
from ride_contract.quality import add_ride, figures
from training import registry
from training.settings import Settings

METRICS = {"rmse": "live_rmse", "mae": "live_mae", "bias": "live_bias", "rides": "live_rides"}
# Beside them, for answers that came with a range: beside the run's test_interval_coverage.
RANGE_METRICS = {"coverage": "live_interval_coverage", "mean_width": "live_interval_mean_width"}
# Printed on the flow's log when production is degraded: the log-based metric of infra/ counts it.
DEGRADED = "LIVE QUALITY DEGRADED"


class QualityDegraded(RuntimeError):
    """Production is degraded; ``summary`` is the flow's summary, so a caller still reports the figures."""

    def __init__(self, problem: str, summary: dict | None = None):
        super().__init__(problem)
        self.summary = summary or {}


@task(name="read-completed-rides", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def read_completed_rides(outcomes_uri: str, since: float) -> tuple[list[CompletedRide], int]:
    """The completed rides whose outcome came after ``since``, each ride once (its first outcome: a repeat of
    a ride_id is ignored), and how many lines could not be read (said, counted, and left where they are)."""
    rides: dict[str, CompletedRide] = {}
    unreadable = 0
    # An object is written after the rides in it were completed: one written before ``since`` holds none after it.
    for line in _read_text(outcomes_uri, written_since=since):
        if not line.strip():
            continue
        try:
            ride = CompletedRide.model_validate_json(line)
        except ValidationError:
            unreadable += 1
            continue
        if ride.outcome_at >= since and (ride.ride_id not in rides or ride.outcome_at < rides[ride.ride_id].outcome_at):
            rides[ride.ride_id] = ride
    return list(rides.values()), unreadable


def closed_windows(windows: dict[int, dict], window_seconds: float, settle_seconds: float, now: float) -> dict[int, dict]:
    """The windows that have ended at least ``settle_seconds`` before ``now`` (their rides are all filed):
    the only ones whose points may be logged, since a point is logged once and never corrected."""
    return {index: models for index, models in windows.items() if (index + 1) * window_seconds + settle_seconds <= now}


def windowed(rides: list[CompletedRide], window_seconds: float) -> dict[int, dict]:
    """Per window (its index: outcome time // window), each model's figures on the window's rides."""
    sums: dict[int, dict[str, float]] = {}
    for ride in rides:
        add_ride(sums.setdefault(int(ride.outcome_at // window_seconds), {}), ride)
    return {index: figures([bucket], window_seconds)["models"] for index, bucket in sorted(sums.items())}


def _runs_of(rides: list[CompletedRide]) -> dict[str, str]:
    """The training run of each answering version ("final v2" and "shadow v2" are both v2's run)."""
    runs = {}
    for ride in rides:
        if ride.duration_final is not None and ride.model_run_id:
            runs[f"final v{ride.model_version}"] = ride.model_run_id
        for shadow in ride.shadow:
            if shadow.model_run_id:
                runs[f"shadow v{shadow.model_version}"] = shadow.model_run_id
    return runs


@task(name="log-live-quality", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def log_live_quality(windows: dict[int, dict], runs: dict[str, str], window_seconds: float, settings: Settings) -> int:
    """Each version's figures per window into its training run (step: the window's index; timestamp: its end).
    A window already logged for a run is not logged again, so the flow can run as often as wanted: pass
    only closed windows (``closed_windows``)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(settings.tracking_uri)
    logged = 0
    for model, run_id in runs.items():
        prefix = "" if model.startswith("final") else "shadow_"  # what riders got, and what they did not see
        done = {m.step for m in client.get_metric_history(run_id, f"{prefix}live_rmse")}
        new = [index for index, models in windows.items() if model in models and index not in done]
        batch = [
            Metric(f"{prefix}{name}", float(windows[index][model][key]), int((index + 1) * window_seconds * 1000), index)
            for index in new
            for key, name in {**METRICS, **RANGE_METRICS}.items()
            if key in windows[index][model]
        ]
        if batch:
            client.log_batch(run_id, metrics=batch)
            logged += len(new)
    return logged


def degradation(
    windows: dict[int, dict], version: str | None, test_rmse: float | None, monitoring: MonitoringSettings
) -> str | None:
    """Why production is degraded in its latest window of enough rides, or None."""
    if version is None or test_rmse is None:
        return None
    model = f"final v{version}"
    judged = [
        (index, models[model])
        for index, models in windows.items()
        if models.get(model, {}).get("rides", 0) >= monitoring.alert_min_rides
    ]
    if not judged:
        return None
    index, latest = judged[-1]
    began = dt.datetime.fromtimestamp(index * monitoring.live_window_minutes * 60, dt.UTC)
    limit = test_rmse * (1 + monitoring.alert_rmse_increase)
    if latest["rmse"] <= limit:
        return None
    return (
        f"{model}: live RMSE {latest['rmse']:.3f} min over {latest['rides']} completed rides (the window from {began:%Y-%m-%d %H:%M} UTC) is above "
        f"its test RMSE {test_rmse:.3f} by more than {monitoring.alert_rmse_increase:.0%} (limit {limit:.3f})"
    )


@flow(name="live-quality", log_prints=True)
def live_quality_flow(outcomes: str | None = None, hours: float = 24.0) -> dict:
    settings, monitoring = Settings.from_env(), MonitoringSettings.from_env()
    outcomes_uri = outcomes or monitoring.outcomes_uri
    if not outcomes_uri:
        raise ValueError("no completed rides to read: pass --outcomes or set OUTCOMES_URI (infra output `outcomes`)")
    window_seconds = monitoring.live_window_minutes * 60
    now = _now()
    rides, unreadable = read_completed_rides(outcomes_uri, now - hours * 3600)
    windows = windowed(rides, window_seconds)
    closed = closed_windows(windows, window_seconds, monitoring.live_window_settle_minutes * 60, now)
    logged = log_live_quality(closed, _runs_of(rides), window_seconds, settings)
    production = registry.current_version(registry.PRODUCTION, settings)
    test_rmse = None
    if production is not None:
        from mlflow import MlflowClient

        client = MlflowClient(settings.tracking_uri)
        run_id = client.get_model_version(settings.model_name, production).run_id
        test_rmse = client.get_run(run_id).data.metrics.get("test_rmse")
    problem = degradation(windows, production, test_rmse, monitoring)
    latest = windows[max(windows)] if windows else {}
    # The last window that has ended: the latest one is still filling (the hourly run starts 5 minutes in).
    complete = int(now // window_seconds) - 1
    summary = {
        "completed_rides": len(rides),
        "unreadable_lines": unreadable,
        "windows": len(windows),
        "points_logged": logged,
        "windows_still_open": len(windows) - len(closed),  # logged by a later run, once they are closed
        "production": production,
        "production_test_rmse": test_rmse,
        "latest_window": latest,
        "complete_window": windows.get(complete, {}),
        "complete_window_start": complete * window_seconds,
        "degraded": problem,
    }
    _publish(summary)
    logger = get_run_logger()
    if unreadable:
        logger.warning("%d lines under %s are not completed rides: skipped (still there)", unreadable, outcomes_uri)
    if problem:
        logger.error("%s: %s", DEGRADED, problem)
        raise QualityDegraded(problem, summary)
    return summary


def _now() -> float:
    """The flow's clock (tests set it: which windows are closed depends on it)."""
    return time.time()


def _publish(summary: dict) -> None:
    from prefect.artifacts import create_table_artifact

    rows = [{"model": model, **figs} for model, figs in summary["latest_window"].items()]
    verdict = (
        f"{DEGRADED}: {summary['degraded']}" if summary["degraded"] else f"production v{summary['production']} within bounds"
    )
    create_table_artifact(rows, key="live-quality", description=f"{summary['completed_rides']} completed rides; {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outcomes", help="completed rides: a gs:// prefix, a folder or a file (default: OUTCOMES_URI)")
    parser.add_argument("--hours", type=float, default=24.0, help="the completed rides of the last H hours")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(live_quality_flow(args.outcomes, args.hours), indent=2))
    except QualityDegraded as exc:
        print(f"{DEGRADED}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
