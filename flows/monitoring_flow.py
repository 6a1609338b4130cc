"""Prefect flow: data drift and model quality of recent rides against the training reference (Evidently).

    python -m flows.monitoring_flow --current-month 2021-02                       # a TLC month, with actual durations
    python -m flows.monitoring_flow --predictions .stack/logs/function.log         # what the serving function logged
    python -m flows.monitoring_flow --predictions gs://ridestream-logs/predictions  # the Cloud Logging sink (infra/)

The reference is the training month scored by the production model. The flow writes
an HTML report and a PNG of the distributions to ``--output-dir`` and logs the
headline numbers (share of drifted columns, per-column drift scores, RMSE when
actual durations are known) to MLflow, experiment ``<experiment>-monitoring``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from data import load_trips, month_uri, split_gs_uri
from ride_contract.result import served_minutes
from ride_contract.ride import RIDE_COLUMNS
from ride_contract.sklearn_features import ride_features
from training import registry
from training.settings import Settings, configure_mlflow

NUMERICAL = ["trip_distance", "pickup_hour", "prediction"]
CATEGORICAL = ["PULocationID", "DOLocationID", "pickup_weekday"]
# Evidently's preset flags a dataset when half of its columns drift; a third is enough to look.
DRIFT_SHARE_ALERT = 1 / 3


def monitoring_frame(rides: pd.DataFrame, predictions, actual: pd.Series | None = None) -> pd.DataFrame:
    """The columns drift is measured on: request-time features, the prediction and (if known) the target."""
    frame = ride_features(rides[RIDE_COLUMNS]).drop(columns=["PU_DO"]).reset_index(drop=True)
    frame["prediction"] = list(predictions)
    if actual is not None:
        frame["target"] = actual.to_numpy()
    return frame


def _read_text(source: str, written_since: float | None = None) -> list[str]:
    """Lines of one file, every file under a folder, or every object under a gs:// prefix; with
    ``written_since`` (epoch seconds), only those written since then (an older one is not downloaded)."""
    if source.startswith("gs://"):
        from google.cloud import storage

        bucket, prefix = split_gs_uri(source)
        blobs = storage.Client().list_blobs(bucket, prefix=prefix or None)
        if written_since is not None:
            blobs = [b for b in blobs if b.time_created is None or b.time_created.timestamp() >= written_since]
        return [line for blob in blobs for line in blob.download_as_text().splitlines()]
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{source} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if written_since is not None:
        files = [f for f in files if f.stat().st_mtime >= written_since]
    return [line for f in files for line in f.read_text(errors="replace").splitlines()]


def read_prediction_log(source: str) -> pd.DataFrame:
    """Prediction records the serving function logged: its own JSON lines, or Cloud Logging's export of them.

    Lines that look like JSON but do not parse are counted in ``attrs["unreadable_lines"]``:
    they may be lost predictions, so the flow reports them instead of hiding them."""
    records = []
    unreadable = 0
    for line in _read_text(source):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            unreadable += line.lstrip().startswith("{")  # not gunicorn's own plain lines
            continue
        entry = entry.get("jsonPayload", entry) if isinstance(entry, dict) else {}
        if entry.get("message") == "prediction" and isinstance(entry.get("ride"), dict):
            records.append({**entry["ride"], "prediction": entry["duration_final"], "model_version": entry.get("model_version")})
    if not records:
        raise ValueError(f"no prediction records in {source}")
    frame = pd.DataFrame(records)
    frame.attrs["unreadable_lines"] = unreadable
    return frame


def scored_month(month: str, alias: str, settings: Settings) -> pd.DataFrame:
    """A TLC month scored by the model behind ``alias``, with its actual durations."""
    configure_mlflow(settings)
    trips = load_trips(month_uri(month, settings.data_base))
    model = registry.load_registered_model(f"models:/{settings.model_name}@{alias}")
    return monitoring_frame(trips, served_minutes(model.predict(trips[RIDE_COLUMNS])), trips["duration"])


@task(name="reference-data", retries=2, retry_delay_seconds=10, cache_policy=NONE)
def reference_data(month: str, alias: str, settings: Settings) -> pd.DataFrame:
    return scored_month(month, alias, settings)


@task(name="current-data", retries=2, retry_delay_seconds=10, cache_policy=NONE)
def current_data(month: str | None, predictions: str | None, alias: str, settings: Settings) -> pd.DataFrame:
    if predictions:
        logged = read_prediction_log(predictions)
        current = monitoring_frame(logged, logged["prediction"])
        current.attrs["unreadable_lines"] = unreadable = logged.attrs["unreadable_lines"]
        if unreadable:
            get_run_logger().warning(
                "%d unreadable lines in %s: predictions may be missing from this report", unreadable, predictions
            )
        return current
    return scored_month(month, alias, settings)


@task(name="drift-report", cache_policy=NONE)
def drift_report(reference: pd.DataFrame, current: pd.DataFrame, output_dir: Path, name: str) -> dict:
    from evidently import DataDefinition, Dataset, Regression, Report
    from evidently.presets import DataDriftPreset, RegressionPreset

    with_target = "target" in reference and "target" in current
    definition = DataDefinition(
        numerical_columns=NUMERICAL + (["target"] if with_target else []),
        categorical_columns=CATEGORICAL,
        regression=[Regression(target="target", prediction="prediction")] if with_target else None,
    )
    presets = [DataDriftPreset(columns=NUMERICAL + CATEGORICAL)] + ([RegressionPreset()] if with_target else [])
    columns = list(definition.numerical_columns) + CATEGORICAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = Report(presets).run(
            current_data=Dataset.from_pandas(current[columns], data_definition=definition),
            reference_data=Dataset.from_pandas(reference[columns], data_definition=definition),
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    html = output_dir / f"{name}.html"
    snapshot.save_html(str(html))

    metrics: dict[str, float] = {}
    for metric in snapshot.dict()["metrics"]:
        label, value = metric["metric_name"], metric["value"]
        if label.startswith("DriftedColumnsCount"):
            metrics["drifted_columns"] = float(value["count"])
            metrics["drift_share"] = float(value["share"])
        elif label.startswith("ValueDrift(column="):
            metrics[f"drift_score_{label.split('column=')[1].split(',')[0]}"] = float(value)
        elif label.startswith("RMSE("):
            metrics["rmse"] = float(value)
    metrics["rows_reference"] = float(len(reference))
    metrics["rows_current"] = float(len(current))
    return {"html": str(html), "metrics": metrics}


@task(name="distribution-plot", cache_policy=NONE)
def distribution_plot(reference: pd.DataFrame, current: pd.DataFrame, output_dir: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (column, bins, limits) in zip(
        axes, [("prediction", 60, (0, 60)), ("trip_distance", 60, (0, 20)), ("pickup_hour", 24, (0, 24))], strict=True
    ):
        for label, frame in (("reference", reference), ("current", current)):
            ax.hist(frame[column].clip(*limits), bins=bins, range=limits, density=True, alpha=0.5, label=label)
        ax.set(title=f"{column} (last bin: {limits[1]} or more)", ylabel="share of rides")
        ax.legend()
    fig.tight_layout()
    path = output_dir / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


@task(name="log-to-mlflow", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def log_to_mlflow(report: dict, plot: str, params: dict, settings: Settings) -> str:
    import mlflow

    configure_mlflow(replace(settings, experiment_name=f"{settings.experiment_name}-monitoring"))
    with mlflow.start_run(run_name=params["name"]) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(report["metrics"])
        mlflow.log_artifact(report["html"], artifact_path="report")
        mlflow.log_artifact(plot, artifact_path="report")
        return run.info.run_id


@task(name="publish-summary", cache_policy=NONE)
def publish_summary(report: dict, verdict: str, name: str) -> None:
    """The drift summary as a table on the flow run in the Prefect UI, with a link to the full HTML report."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    metrics = report["metrics"]
    rows = [
        {"measure": key.removeprefix("drift_score_"), "drift score": round(value, 4)}
        for key, value in metrics.items()
        if key.startswith("drift_score_")
    ]
    rows += [{"measure": key, "value": round(value, 4)} for key, value in metrics.items() if not key.startswith("drift_score_")]
    create_table_artifact(rows, key="drift-summary", description=f"{name}: {verdict}")
    create_link_artifact(Path(report["html"]).resolve().as_uri(), link_text=f"{name} (Evidently report)", key="drift-report")


@flow(name="monitor-drift", log_prints=True)
def monitoring_flow(
    reference_month: str = "2021-01",
    current_month: str | None = "2021-02",
    predictions: str | None = None,
    output_dir: str = "reports",
    alias: str = registry.PRODUCTION,
) -> dict:
    settings = Settings.from_env()
    name = f"drift-{reference_month}-vs-{Path(predictions).name if predictions else current_month}"
    reference = reference_data(reference_month, alias, settings)
    current = current_data(current_month, predictions, alias, settings)
    report = drift_report(reference, current, Path(output_dir), name)
    report["metrics"]["unreadable_log_lines"] = float(current.attrs.get("unreadable_lines", 0))
    plot = distribution_plot(reference, current, Path(output_dir), name)
    params = {"name": name, "reference_month": reference_month, "current": predictions or current_month, "alias": alias}
    run_id = log_to_mlflow(report, plot, params, settings)
    drift_share = report["metrics"]["drift_share"]
    verdict = "drift: look at the report" if drift_share >= DRIFT_SHARE_ALERT else "no material drift"
    get_run_logger().info("%s (%.0f%% of columns drifted); report %s", verdict, 100 * drift_share, report["html"])
    publish_summary(report, verdict, name)
    return {
        "report": report["html"],
        "plot": plot,
        "mlflow_run_id": run_id,
        "alert": drift_share >= DRIFT_SHARE_ALERT,
        **report["metrics"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-month", default="2021-01")
    parser.add_argument("--current-month", default="2021-02")
    parser.add_argument("--predictions", help="prediction log: a file, folder or gs:// prefix (instead of a month)")
    parser.add_argument("--output-dir", default="reports")
    args = parser.parse_args(argv)
    result = monitoring_flow(args.reference_month, args.current_month, args.predictions, args.output_dir)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
