"""The guarded rollout on the real local stack while riders keep coming, with the controller's own faults.

One stack of the test's own (emulators, an MLflow server, the function and its shadow deployment, a
backend, the controller with a 5 s resync) and three real models: devstack/rollouts.py. The
scenarios run in order; benchmarks/rollout_bench.py prints the same figures.
"""

from __future__ import annotations

import pytest
from conftest import assert_runs_as_shipped, started_as_client

from devstack.deployables import ROLLOUT, TRACKING_SERVER
from devstack.rollouts import NOTICE_BOUND_SECONDS, ROLLOUT_SCENARIOS, RolloutStack

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory):
    yield from started_as_client(RolloutStack(tmp_path_factory.mktemp("rollouts") / "stack"))


@pytest.fixture(scope="module")
def results(rollouts):
    return {name: scenario(rollouts) for name, scenario in ROLLOUT_SCENARIOS.items()}


def test_a_controller_killed_mid_shadow_resumes_and_the_version_reaches_riders(results, rollouts):
    killed = results["controller-killed"]
    print(killed)
    assert killed["outcome"] == "rolled out" and killed["lost"] == 0, killed
    assert killed["attempts"] == "2"  # the restarted controller went on with the same rollout
    assert killed["phase_tags"] == {"rollout_status": "serving production", "rollout_phase": "serving"}
    assert killed["phases"]["preflight"] == {"passed": True, "resumed": True}  # not run again
    # The shadow window went on from where the killed controller opened it, not from the restart.
    assert killed["phases"]["shadow"]["window_opened_at"] == round(float(killed["shadow_began_at"]), 3), killed
    assert killed["model_versions_seen"] == [rollouts.versions["serving"], rollouts.versions["retrained"]]


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
