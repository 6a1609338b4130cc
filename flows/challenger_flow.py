"""Prefect flow: champion vs challenger on the same real rides, scored against their actual durations.

    python -m flows.challenger_flow --champion .stack/logs/function.log --challenger .stack/logs/challenger.log --month 2021-03

Both functions log a prediction record for every ride they answer (the challenger's in
shadow: riders never see it). Rides are matched to the TLC month they came from by their
four fields, which gives each its actual duration; the two models are compared on the
rides both answered, and the comparison is logged to MLflow (experiment
``<experiment>-monitoring``, run ``champion-vs-challenger``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger

from data import load_trips, month_uri
from flows.monitoring_flow import read_prediction_log
from ride_contract.ride import RIDE_COLUMNS
from training.settings import Settings, configure_mlflow


def with_actual_durations(predictions: pd.DataFrame, trips: pd.DataFrame) -> pd.DataFrame:
    """The predictions of rides found in ``trips``, with their actual ``duration``; one row per ride."""
    rides = predictions.assign(datetime=pd.to_datetime(predictions["datetime"])).drop_duplicates(RIDE_COLUMNS, keep="last")
    # A ride's four fields name one trip; the few trips that share them all are dropped, being ambiguous.
    unique_trips = trips[[*RIDE_COLUMNS, "duration"]].drop_duplicates(RIDE_COLUMNS, keep=False)
    return rides.merge(unique_trips, on=RIDE_COLUMNS, how="inner")


def compare(champion: pd.DataFrame, challenger: pd.DataFrame) -> dict:
    both = champion.merge(challenger, on=[*RIDE_COLUMNS, "duration"], suffixes=("_champion", "_challenger"))
    # Once the challenger is promoted, both deployments answer with the same version: no comparison there.
    both = both[both["model_version_champion"].astype(str) != both["model_version_challenger"].astype(str)]
    if both.empty:
        raise ValueError("no ride was answered by both models (different versions) with a known actual duration")

    def rmse(column: str) -> float:
        return float(np.sqrt(np.mean((both[column] - both["duration"]) ** 2)))

    champion_rmse, challenger_rmse = rmse("prediction_champion"), rmse("prediction_challenger")
    return {
        "rides": len(both),
        "champion_versions": sorted({str(v) for v in both["model_version_champion"]}),
        "challenger_versions": sorted({str(v) for v in both["model_version_challenger"]}),
        "champion_rmse": round(champion_rmse, 3),
        "challenger_rmse": round(challenger_rmse, 3),
        "challenger_better": challenger_rmse < champion_rmse,
    }


@flow(name="champion-vs-challenger", log_prints=True)
def challenger_flow(champion_log: str, challenger_log: str, month: str, data_base: str | None = None) -> dict:
    settings = Settings.from_env()
    trips = load_trips([month_uri(month, data_base or settings.data_base)])
    champion = with_actual_durations(read_prediction_log(champion_log), trips)
    challenger = with_actual_durations(read_prediction_log(challenger_log), trips)
    result = {"month": month, **compare(champion, challenger)}
    import mlflow

    configure_mlflow(replace(settings, experiment_name=f"{settings.experiment_name}-monitoring"))
    with mlflow.start_run(run_name="champion-vs-challenger") as run:
        mlflow.log_params({k: ",".join(v) if isinstance(v, list) else v for k, v in result.items() if not k.endswith("rmse")})
        mlflow.log_metrics(
            {"champion_rmse": result["champion_rmse"], "challenger_rmse": result["challenger_rmse"], "rides": result["rides"]}
        )
        result["mlflow_run_id"] = run.info.run_id
    get_run_logger().info("champion vs challenger: %s", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--champion", required=True, help="the production function's prediction log (file, folder or gs://)")
    parser.add_argument("--challenger", required=True, help="the shadow function's prediction log")
    parser.add_argument("--month", required=True, help="the TLC month the rides came from (their actual durations)")
    args = parser.parse_args(argv)
    print(json.dumps(challenger_flow(args.champion, args.challenger, args.month), indent=2))


if __name__ == "__main__":
    main()
