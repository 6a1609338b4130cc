"""The guarded rollout on the real local stack while riders keep coming, with the controller's own faults.

One stack of the test's own (emulators, an MLflow server, the function and its shadow deployment, a
backend, the controller with a 5 s resync) and five real models: devstack/rollouts.py. The
scenarios run in order; benchmarks/rollout_bench.py prints the same figures.
"""

from __future__ import annotations

import time

import pytest
import requests
from conftest import assert_runs_as_shipped, started_as_client

from devstack.deployables import ROLLOUT, TRACKING_SERVER
from devstack.rollouts import NOTICE_BOUND_SECONDS, ROLLOUT_SCENARIOS, RolloutStack

# The first test carries the stack's start (three real models trained, every server): a hang guard above it.
pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory):
    yield from started_as_client(RolloutStack(tmp_path_factory.mktemp("rollouts") / "stack"))


@pytest.fixture(scope="module")
def results(rollouts):
    return {name: scenario(rollouts) for name, scenario in ROLLOUT_SCENARIOS.items()}


def test_a_controller_killed_mid_shadow_and_again_mid_bake_resumes_each_on_rides_of_its_own(results, rollouts):
    killed = results["controller-killed"]
    print(killed)
    assert killed["outcome"] == "rolled out" and killed["lost"] == 0, killed
    assert killed["phase_tags"] == {"rollout_status": "serving production", "rollout_phase": "serving"}
    shadow, bake = killed["recorded"]["shadow"], killed["recorded"]["bake"]
    # Each resumed phase opened a window of its own after the restart (what the killed one had read died with
    # it) and passed on at least its minimum of rides read since (SCENARIO_ANALYSIS: 60 each).
    assert shadow["window_opened_at"] > killed["killed_in_shadow_at"] > float(killed["shadow_began_at"]), killed
    assert bake["window_opened_at"] > killed["killed_in_bake_at"], killed
    assert shadow["rides"] >= 60 and bake["rides"] >= 60, killed
    assert killed["model_versions_seen"] == [rollouts.versions["serving"], rollouts.versions["retrained"]]


def test_pubsub_down_for_a_minute_mid_shadow_loses_no_ride_and_a_good_version_still_reaches_riders(results, rollouts):
    outage = results["pubsub-unavailable"]
    print(outage)
    assert outage["outcome"] == "rolled out" and outage["lost"] == 0, outage
    assert rollouts.versions["retrained-again"] in outage["model_versions_seen"], outage
    assert outage["recorded"]["shadow"]["rides"] >= 60, outage


def test_a_controller_deployed_over_itself_never_acts_twice_and_the_new_one_ends_the_rollout(results, rollouts):
    deployed = results["deployed-over-itself"]
    print(deployed)
    # Side by side for seconds: the old one held the lease throughout, the new one never did.
    assert deployed["overlap_samples"] >= 5 and deployed["both_held"] == 0 and deployed["old_held_throughout"], deployed
    # The old one stopped and let the lease go: the new one took it, resumed the shadow and ended the rollout.
    assert deployed["outcome"] == "rolled out" and deployed["lost"] == 0, deployed
    assert deployed["lease_after"]["held"], deployed
    assert deployed["recorded"]["shadow"]["rides"] >= 60 and deployed["recorded"]["bake"]["rides"] >= 60, deployed


def test_a_broken_version_is_blocked_in_shadow_and_no_rider_gets_its_answer(results, rollouts):
    blocked = results["broken-blocked"]
    print(blocked)
    assert blocked["outcome"] == "blocked" and "shadow analysis" in blocked["message"], blocked
    assert blocked["riders_answered_by_it"] == 0 and blocked["lost"] == 0, blocked
    assert blocked["alias_back_on"] == blocked["serving_before"] == rollouts.versions["retrained"]
    assert blocked["tags"]["rollout_status"] == "blocked" and "median |candidate - serving|" in blocked["tags"]["rollout_reason"]


def test_a_rollback_whose_webhook_was_dropped_is_made_by_the_resync_and_skips_the_analysis(results):
    dropped = results["webhook-dropped"]
    print(dropped)
    assert dropped["outcome"] == "rolled out" and dropped["lost"] == 0, dropped
    # Known good (it served before): pre-flight and the switch only.
    assert "(known good)" in dropped["message"] and "shadow" not in dropped["phases"] and dropped["phases"]["preflight"]["passed"]
    # Converged by the resync alone: noticed within one period, then the (known good) rollout itself.
    noticed_after = dropped["seconds_from_alias_set_to_rollout_ended"] - dropped["rollout_seconds"]
    assert noticed_after <= NOTICE_BOUND_SECONDS, dropped


def test_the_controller_and_the_tracking_server_run_from_what_they_ship(rollouts):
    """The controller imports only what rollout/requirements.txt installs and rollout/Dockerfile copies (plus the
    stack's stand-in targets, devstack/); the tracking server only tracking_server/requirements.txt."""
    pids = rollouts.stack.pids
    assert_runs_as_shipped(
        pids["rollout"], ROLLOUT, runs="devstack.rollout_service", lacks=("pandas", "prefect", "flows", "backend")
    )
    assert_runs_as_shipped(pids["mlflow"], TRACKING_SERVER, runs="mlflow.server", lacks=("prefect", "redis", "training"))


def test_every_identity_touches_exactly_what_infra_grants_it(results, rollouts, prefect_harness, monkeypatch):
    """After the scenarios (training, guarded promotions with pre-flight, shadow and bake, a block, a rollback,
    riders all along), the rest of a day: riders report how their rides ended, a poison ride is dead-lettered,
    health is checked, an operator browses a run's artifacts in the MLflow UI, and the flows read the completed
    rides. Each deployable reached the emulators through its identity's own recording proxy (devstack/access):
    what each touched must be exactly what infra/ grants it, no more (the pre-flight's read of the models bucket
    was once missing) and no less, apart from NOT_EXERCISED; docs/identities.md shows the same record."""
    from google.cloud import pubsub_v1
    from mlflow import MlflowClient

    from devstack.access.grants import DOCS_RECORD, NOT_EXERCISED, compare, in_infra, parse_grants
    from devstack.access.record import read_record
    from devstack.stack import PROJECT, TOPICS
    from devstack.traffic import real_rides, stream, summarize
    from flows.live_quality_flow import live_quality_flow
    from training.settings import Settings

    stack = rollouts.stack
    outcomes = stream(stack.backend_urls, real_rides(40, seed=21), concurrency=4, report_outcomes=True)
    assert summarize(outcomes)["lost"] == 0
    # A ride the function cannot read: dead-lettered by the function itself (published by an operator, straight
    # to the emulator: this process otherwise stands for the training identity).
    with monkeypatch.context() as operator:
        operator.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{stack.ports['pubsub']}")
        poison = pubsub_v1.PublisherClient()
        poison.publish(poison.topic_path(PROJECT, TOPICS["push"]), b"not a ride").result(timeout=60)
    for url in stack.backend_urls:  # what Cloud Run's probe and an operator ask
        assert requests.get(f"{url}/readyz", timeout=30).status_code in (200, 503)
    settings = Settings.from_env()
    client = MlflowClient(stack.urls["mlflow"])
    run_id = client.get_model_version(settings.model_name, rollouts.versions["serving"]).run_id
    listed = requests.get(f"{stack.urls['mlflow']}/ajax-api/2.0/mlflow/artifacts/list", params={"run_id": run_id}, timeout=60)
    assert listed.ok and listed.json().get("files"), listed.text  # the UI's artifact view, which the server reads
    deadline = time.monotonic() + 120  # the sink files completed rides every few seconds
    while requests.get(f"{stack.urls['outcome-sink']}/healthz", timeout=10).json()["rides"] < len(outcomes):
        assert time.monotonic() < deadline, "the outcome sink did not file the completed rides"
        time.sleep(1)
    assert live_quality_flow(hours=1, return_state=True).is_final()
    deadline = time.monotonic() + 120  # the dead letter is in the record once the function has published it
    while not any(u.resource.endswith(TOPICS["dead"]) for u in read_record(stack.access_record) if u.identity == "function"):
        assert time.monotonic() < deadline, "the function never dead-lettered the poison ride"
        time.sleep(1)

    record = read_record(stack.access_record)
    report = compare(in_infra(record), parse_grants(), NOT_EXERCISED)
    assert report.ok, "\n".join(report.lines())
    # The identity page shows this record. When the deployables' uses change, keep the new one (printed below) as
    # docs/identities.record.jsonl and run `python -m devstack.access.report --record docs/identities.record.jsonl
    # --write-docs`.
    assert DOCS_RECORD.exists()
    assert record == read_record(DOCS_RECORD), "docs/identities.record.jsonl is not this run's record, which is:\n" + "".join(
        u.line() + "\n" for u in sorted(record)
    )
