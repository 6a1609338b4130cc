"""Prefect flow: score a whole month with the production model, write predictions as parquet.

    python -m flows.scoring_flow --month 2021-03 --output predictions/green_2021-03.parquet
    python -m flows.scoring_flow --month 2021-03 --output gs://ridestream-predictions/green_2021-03.parquet

Each row keeps a ride_id (``<color>-<month>-<row>``, stable for the same file),
the ride, the actual duration, the prediction and the model version and run.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from data import available_months, load_trips, month_uri, split_gs_uri
from ride_contract.result import served_minutes
from ride_contract.ride import RIDE_COLUMNS
from training import registry
from training.settings import Settings, configure_mlflow


@task(name="load-month", retries=2, retry_delay_seconds=10, cache_policy=NONE)
def load_month(month: str, color: str, settings: Settings) -> pd.DataFrame:
    trips = load_trips(month_uri(month, settings.data_base, color))
    trips.insert(0, "ride_id", [f"{color}-{month}-{i}" for i in range(len(trips))])
    return trips


@task(name="predict", cache_policy=NONE)
def predict(trips: pd.DataFrame, alias: str, settings: Settings) -> pd.DataFrame:
    configure_mlflow(settings)
    model = registry.resolve(alias, settings)
    predictions = trips.rename(columns={"duration": "duration_actual"})
    # What riders would have been told: the answers as the function serves them.
    predicted = registry.load_registered_model(model.model_uri).predict(trips[RIDE_COLUMNS])
    predictions["duration_predicted"] = served_minutes(predicted)
    predictions["model_version"] = model.version
    predictions["model_run_id"] = model.run_id
    return predictions


@task(name="write-predictions", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def write(predictions: pd.DataFrame, output: str) -> str:
    table = pa.Table.from_pandas(predictions, preserve_index=False)
    if output.startswith("gs://"):
        from google.cloud import storage

        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        bucket, key = split_gs_uri(output)
        storage.Client().bucket(bucket).blob(key).upload_from_string(buffer.getvalue(), content_type="application/octet-stream")
    else:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, output)
    return output


@flow(name="batch-score-month", log_prints=True)
def scoring_flow(
    month: str | None = None, output: str | None = None, color: str = "green", alias: str = registry.PRODUCTION
) -> dict:
    """Score ``month`` (default: the newest month available) with the model behind ``alias``."""
    settings = Settings.from_env()
    month = month or available_months(settings.data_base, color)[-1]
    output = output or f"predictions/{color}_{month}.parquet"
    trips = load_month(month, color, settings)
    predictions = predict(trips, alias, settings)
    path = write(predictions, output)
    rmse = float(((predictions["duration_predicted"] - predictions["duration_actual"]) ** 2).mean() ** 0.5)
    get_run_logger().info("wrote %d predictions to %s (RMSE %.3f)", len(predictions), path, rmse)
    version = predictions["model_version"].iloc[0] if len(predictions) else None
    return {"output": path, "rows": len(predictions), "model_version": version, "rmse": rmse}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--month", help="YYYY-MM (default: the newest available)")
    parser.add_argument("--output")
    parser.add_argument("--color", default="green")
    parser.add_argument("--alias", default=registry.PRODUCTION)
    args = parser.parse_args(argv)
    print(json.dumps(scoring_flow(args.month, args.output, args.color, args.alias), indent=2))


if __name__ == "__main__":
    main()
