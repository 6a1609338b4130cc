"""Prefect flow: load -> validate -> train -> evaluate -> register -> promote (gated).

    python -m flows.training_flow                                  # Jan/Feb/Mar 2021 from data/
    python -m flows.training_flow --latest                         # the newest three months available
    python -m flows.training_flow --model-family linear --trials 1

The new version becomes ``production`` only if it beats the current production
version on the same test month, both re-scored here; otherwise it stays
registered as ``challenger`` and the flow says why. The first model is promoted.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from data import TripDataError, latest_split
from flows.version_story import plot_links, version_story
from ride_contract.ride import MAX_LOCATION_ID, MIN_LOCATION_ID, RIDE_COLUMNS
from training import registry
from training.settings import Settings, configure_mlflow
from training.train import Splits, TrainConfig, TrainResult, fit_and_log, load_splits, score

# Expected shape of a month of green trips after the loader's filters; a month far below
# this is a broken download or a schema change, not a reason to retrain.
MIN_ROWS_PER_SPLIT = 1_000
MAX_ZERO_DISTANCE_SHARE = 0.2


@dataclass(frozen=True)
class Decision:
    version: str
    promoted: bool
    alias: str
    reason: str
    candidate_rmse: float
    production_version: str | None
    production_rmse: float | None


@task(name="load-trips", retries=2, retry_delay_seconds=10, cache_policy=NONE)
def load_data(config: TrainConfig, settings: Settings) -> Splits:
    return load_splits(config, settings)


@task(name="validate-trips", cache_policy=NONE)
def validate_data(splits: Splits, sample: int | None) -> dict[str, int]:
    """Refuse to train on data that looks broken, saying what is wrong."""
    logger = get_run_logger()
    minimum = min(MIN_ROWS_PER_SPLIT, sample or MIN_ROWS_PER_SPLIT)
    problems = []
    for name, frame in splits.frames.items():
        if len(frame) < minimum:
            problems.append(f"{name}: only {len(frame)} rows (expected at least {minimum})")
            continue
        with_gaps = [c for c in (*RIDE_COLUMNS, "duration") if frame[c].isna().any()]
        if with_gaps:
            problems.append(f"{name}: missing values in {', '.join(with_gaps)}")
        zero_share = float((frame["trip_distance"] <= 0).mean())
        if zero_share > MAX_ZERO_DISTANCE_SHARE:
            problems.append(f"{name}: {zero_share:.0%} of trips have no distance")
        zones = frame[["PULocationID", "DOLocationID"]]
        bad_zones = ~zones.apply(lambda ids: ids.between(MIN_LOCATION_ID, MAX_LOCATION_ID)).all(axis=1)
        if bad_zones.any():
            problems.append(f"{name}: {int(bad_zones.sum())} trips with zone IDs outside {MIN_LOCATION_ID}-{MAX_LOCATION_ID}")
    if problems:
        raise TripDataError("data validation failed: " + "; ".join(problems))
    rows = {name: len(frame) for name, frame in splits.frames.items()}
    logger.info("data ok: %s", rows)
    return rows


@task(name="train-and-log", cache_policy=NONE)
def train_model(config: TrainConfig, splits: Splits, settings: Settings) -> TrainResult:
    result = fit_and_log(config, splits, settings)
    get_run_logger().info(
        "run %s: val RMSE %.3f, test RMSE %.3f", result.run_id, result.metrics["val_rmse"], result.metrics["test_rmse"]
    )
    return result


@task(name="evaluate-against-production", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def evaluate(candidate: TrainResult, test: pd.DataFrame, settings: Settings) -> tuple[float, str | None, float | None]:
    """Candidate and current production, re-scored on the same test rows."""
    configure_mlflow(settings)
    candidate_rmse = score(registry.load_registered_model(candidate.model_uri), test)["rmse"]
    production = registry.current_version(registry.PRODUCTION, settings)
    if production is None:
        return candidate_rmse, None, None
    production_rmse = score(registry.load_registered_model(f"models:/{settings.model_name}@{registry.PRODUCTION}"), test)["rmse"]
    return candidate_rmse, production, production_rmse


@task(name="register-model", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def register(candidate: TrainResult, settings: Settings) -> str:
    return str(registry.register(candidate.model_uri, candidate.run_id, settings).version)


@task(name="promote-if-better", cache_policy=NONE)
def promote(
    version: str,
    candidate_rmse: float,
    production: str | None,
    production_rmse: float | None,
    min_improvement: float,
    settings: Settings,
) -> Decision:
    logger = get_run_logger()
    if production is None:
        registry.promote(version, settings)
        decision = Decision(version, True, registry.PRODUCTION, "no production model yet", candidate_rmse, None, None)
    elif candidate_rmse < production_rmse - min_improvement:
        registry.promote(version, settings)
        reason = f"test RMSE {candidate_rmse:.3f} beats production v{production}'s {production_rmse:.3f}"
        decision = Decision(version, True, registry.PRODUCTION, reason, candidate_rmse, production, production_rmse)
    else:
        registry.set_alias(version, registry.CHALLENGER, settings)
        reason = (
            f"test RMSE {candidate_rmse:.3f} does not beat production v{production}'s {production_rmse:.3f}"
            f" by more than {min_improvement:g}; production stays v{production}"
        )
        decision = Decision(version, False, registry.CHALLENGER, reason, candidate_rmse, production, production_rmse)
    logger.info("v%s -> %s: %s", version, decision.alias, decision.reason)
    return decision


@task(name="describe-version", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def describe_version(version: str, config: TrainConfig, candidate: TrainResult, decision: Decision, settings: Settings) -> str:
    """The decision and its numbers on the version's page in the MLflow UI, and as this flow run's artifact."""
    from mlflow import MlflowClient
    from prefect.artifacts import create_markdown_artifact

    experiment_id = MlflowClient(settings.tracking_uri).get_run(candidate.run_id).info.experiment_id
    months = {"train": config.train_months, "val": config.val_months, "test": config.test_months}
    links = plot_links(settings.tracking_uri, experiment_id, candidate.run_id)
    description, tags = version_story(version, months, candidate.metrics, decision, links)
    registry.describe(version, description, tags, settings)
    create_markdown_artifact(description, key="model-decision", description=f"{settings.model_name} v{version}")
    return description


@flow(name="train-ride-duration", log_prints=True)
def training_flow(
    train_months: list[str] | None = None,
    val_months: list[str] | None = None,
    test_months: list[str] | None = None,
    model_family: str = "hgb",
    trials: int = 3,
    sample: int | None = None,
    min_improvement: float = 0.0,
    latest: bool = False,
) -> dict:
    """Train on the given months (or, with ``latest``, the newest three available) and gate promotion."""
    settings = Settings.from_env()
    if latest:
        train_month, val_month, test_month = latest_split(settings.data_base)
        train_months, val_months, test_months = [train_month], [val_month], [test_month]
    config = TrainConfig(
        train_months=train_months or ["2021-01"],
        val_months=val_months or ["2021-02"],
        test_months=test_months or ["2021-03"],
        family=model_family,
        trials=trials,
        register=False,
        sample=sample,
    )
    configure_mlflow(settings)
    splits = load_data(config, settings)
    validate_data(splits, sample)
    candidate = train_model(config, splits, settings)
    candidate_rmse, production, production_rmse = evaluate(candidate, splits.frames["test"], settings)
    version = register(candidate, settings)
    decision = promote(version, candidate_rmse, production, production_rmse, min_improvement, settings)
    describe_version(version, config, candidate, decision, settings)
    return {"run_id": candidate.run_id, **asdict(decision)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-month", nargs="+")
    parser.add_argument("--val-month", nargs="+")
    parser.add_argument("--test-month", nargs="+")
    parser.add_argument("--model-family", default="hgb")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--sample", type=int)
    parser.add_argument("--min-improvement", type=float, default=0.0)
    parser.add_argument("--latest", action="store_true", help="train on the newest three months available")
    parser.add_argument("--json-out", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = training_flow(
        args.train_month,
        args.val_month,
        args.test_month,
        args.model_family,
        args.trials,
        args.sample,
        args.min_improvement,
        args.latest,
    )
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
