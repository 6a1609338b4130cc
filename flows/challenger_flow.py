"""Prefect flow: champion against challenger on the same completed rides, with the uncertainty of the difference.

    python -m flows.challenger_flow                               # production vs challenger, OUTCOMES_URI, last 24 h
    python -m flows.challenger_flow --champion 1 --challenger 2 --outcomes gs://B/outcomes/ --hours 6

Every ride the backend completes carries its final (the champion's answer) and the shadow's answer
(the challenger's, which riders never saw) beside its actual duration. On the rides both versions
answered, in either role, the flow computes RMSE(challenger) - RMSE(champion) with a paired bootstrap
95 % interval (ride_contract.quality, the function the guarded rollout uses), and says a side only
when the interval excludes zero: "not yet distinguishable" otherwise. Below ``MIN_RIDES`` rides
with outcomes it gives no verdict at all ("not enough outcomes: n of N"): on a handful of rides a
percentile bootstrap's interval is too narrow (at n = 5 it says "better" 19 % of the time when
there is no difference). The verdict goes on the
challenger's version page (tags and description), on the flow run (an artifact) and into MLflow
(experiment ``<experiment>-monitoring``, run ``champion-vs-challenger``).

It replaces the comparison that joined the functions' prediction logs to a TLC month's parquet by
the rides' four fields: that worked only for rides taken from a TLC file, never in a deployment.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.live_quality_flow import read_completed_rides
from flows.settings import MonitoringSettings
from ride_contract.outcome import CompletedRide
from ride_contract.quality import paired_rmse_difference, paired_verdict
from training import registry
from training.settings import Settings, configure_mlflow

BOOTSTRAP_SAMPLES = 2000
# Completed rides answered by both versions a verdict needs (the flow's min_rides, --min-rides); the
# guarded rollout's own minimum is ROLLOUT_MIN_OUTCOMES, 100 as well.
MIN_RIDES = 100


def answers_by_version(ride: CompletedRide) -> dict[str, float]:
    """Each version's answer to the ride, final or shadow."""
    answers = {shadow.model_version: shadow.duration_final for shadow in ride.shadow}
    if ride.duration_final is not None and ride.model_version:
        answers[ride.model_version] = ride.duration_final
    return answers


def paired(rides: list[CompletedRide], champion: str, challenger: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(champion's answers, challenger's answers, actual durations) on the rides both versions answered."""
    rows = [
        (answers[champion], answers[challenger], ride.actual_minutes)
        for ride in rides
        if champion in (answers := answers_by_version(ride)) and challenger in answers
    ]
    matrix = np.array(rows, dtype=float).reshape(-1, 3)
    return matrix[:, 0], matrix[:, 1], matrix[:, 2]


def compare(
    champion_answers,
    challenger_answers,
    actual,
    champion: str,
    challenger: str,
    samples: int = BOOTSTRAP_SAMPLES,
    min_rides: int = MIN_RIDES,
) -> dict:
    rides = len(actual)
    if not rides:
        raise ValueError(f"no completed rides answered by both v{champion} and v{challenger}: nothing to compare")

    def rmse(answers) -> float:
        return round(float(np.sqrt(np.mean((answers - actual) ** 2))), 3)

    result = {
        "rides": rides,
        "min_rides": min_rides,
        "champion": champion,
        "challenger": challenger,
        "champion_rmse": rmse(champion_answers),
        "challenger_rmse": rmse(challenger_answers),
    }
    if rides < min_rides:  # no interval at all: on a few rides a percentile bootstrap's is too narrow to trust
        return {
            **result,
            "rmse_diff_minutes": round(result["challenger_rmse"] - result["champion_rmse"], 3),
            "rmse_diff_ci95": None,
            "challenger_better": None,
            "verdict": f"not enough outcomes: {rides} of {min_rides} completed rides answered by both v{challenger} and v{champion}",
        }
    low, estimate, high = paired_rmse_difference(challenger_answers, champion_answers, actual, samples)
    return {
        **result,
        "rmse_diff_minutes": round(estimate, 3),
        "rmse_diff_ci95": [round(low, 3), round(high, 3)],
        # A side only when the interval excludes zero.
        "challenger_better": True if high < 0 else False if low > 0 else None,
        "verdict": paired_verdict(low, estimate, high, rides, f"v{challenger}", f"v{champion}"),
    }


@task(name="tell-the-challenger", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def tell_the_challenger(result: dict, settings: Settings) -> None:
    """The verdict on the challenger's version page: tags, and a paragraph of its description."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    name, version = settings.model_name, result["challenger"]
    for key, value in {
        "live_comparison": result["verdict"][:500],
        "live_comparison_against": f"v{result['champion']}",
        "live_rmse_diff_ci95": json.dumps(result["rmse_diff_ci95"]),
        "live_comparison_rides": str(result["rides"]),
    }.items():
        client.set_model_version_tag(name, version, key, value)
    description = client.get_model_version(name, version).description or ""
    paragraph = f"**Live, against v{result['champion']}**: {result['verdict']}."
    client.update_model_version(name, version, description=f"{description}\n\n{paragraph}".strip())


@flow(name="champion-vs-challenger", log_prints=True)
def challenger_flow(
    champion: str | None = None,
    challenger: str | None = None,
    outcomes: str | None = None,
    hours: float = 24.0,
    min_rides: int = MIN_RIDES,
) -> dict:
    settings, monitoring = Settings.from_env(), MonitoringSettings.from_env()
    champion = champion or registry.current_version(registry.PRODUCTION, settings)
    challenger = challenger or registry.current_version(registry.CHALLENGER, settings)
    if not champion or not challenger:
        raise ValueError(
            "name both versions (--champion, --challenger), or give the registry a production and a challenger alias"
        )
    outcomes_uri = outcomes or monitoring.outcomes_uri
    if not outcomes_uri:
        raise ValueError("no completed rides to read: pass --outcomes or set OUTCOMES_URI (infra output `outcomes`)")
    rides, _ = read_completed_rides(outcomes_uri, time.time() - hours * 3600)
    result = compare(*paired(rides, champion, challenger), champion, challenger, min_rides=min_rides)
    tell_the_challenger(result, settings)
    import mlflow
    from prefect.artifacts import create_table_artifact

    configure_mlflow(replace(settings, experiment_name=f"{settings.experiment_name}-monitoring"))
    with mlflow.start_run(run_name="champion-vs-challenger") as run:
        params = {
            "champion": champion,
            "challenger": challenger,
            "outcomes": outcomes_uri,
            "hours": hours,
            "min_rides": min_rides,
        }
        mlflow.log_params(params)
        metrics = {key: result[key] for key in ("rides", "champion_rmse", "challenger_rmse", "rmse_diff_minutes")}
        if result["rmse_diff_ci95"] is not None:  # none below min_rides
            metrics["rmse_diff_ci95_low"], metrics["rmse_diff_ci95_high"] = result["rmse_diff_ci95"]
        mlflow.log_metrics(metrics)
        result["mlflow_run_id"] = run.info.run_id
    rows = [
        {"version": f"v{v}", "role": role, "live RMSE": result[f"{role}_rmse"]}
        for role, v in (("champion", champion), ("challenger", challenger))
    ]
    create_table_artifact(rows, key="champion-vs-challenger", description=result["verdict"])
    get_run_logger().info("champion vs challenger: %s", result["verdict"])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--champion", help="a version (default: the production alias)")
    parser.add_argument("--challenger", help="a version (default: the challenger alias)")
    parser.add_argument("--outcomes", help="completed rides: a gs:// prefix, folder or file (default: OUTCOMES_URI)")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--min-rides", type=int, default=MIN_RIDES, help="rides with outcomes a verdict needs")
    args = parser.parse_args(argv)
    print(json.dumps(challenger_flow(args.champion, args.challenger, args.outcomes, args.hours, args.min_rides), indent=2))


if __name__ == "__main__":
    main()
