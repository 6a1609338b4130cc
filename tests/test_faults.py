"""Faults on the real stack: no ride lost, no wrong answer, no 500, recovery within a bound.

Every scenario runs against a stack of the test's own (its Redis too, never the machine's):
see devstack/faults.py. benchmarks/fault_bench.py prints the same scenarios as a table.
"""

from __future__ import annotations

import pytest
from conftest import started_as_client

from devstack.faults import RECOVERY_BOUND_SECONDS, SCENARIOS, FaultStack, dead_subscribers_reproduction, run_scenario

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    yield from started_as_client(FaultStack(tmp_path_factory.mktemp("faults") / "stack"))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_no_ride_is_lost_or_wrong_and_no_client_sees_a_500(faults, scenario):
    outcome = run_scenario(faults, scenario)
    print(outcome.row())
    assert outcome.lost == 0, outcome
    assert outcome.wrong == 0, outcome
    assert outcome.server_errors == 0 and outcome.missing_retry_after == 0, outcome
    assert outcome.done + outcome.failed == outcome.sent
    assert outcome.recovery_seconds < RECOVERY_BOUND_SECONDS, outcome
    if scenario == "reuse":
        assert faults.reuse_statuses == [409] * 6  # the API refuses another ride under a used ride_id
    if scenario == "storage-restart":
        # The instance that could not start said where it looked, in the model store's words.
        assert "ModelStoreUnavailable: cannot read the model at gs://ridestream-models/mlflow" in faults.storage_outage_error
        assert outcome.failed == 0  # the rides waited out the outage and were answered
    assert outcome.out_of_bounds == 0, outcome
    if scenario in ("redis-restart", "redis-hang", "redis-oom"):
        assert outcome.retried_503 > 0  # the outage was seen, as 503s the clients retried
    if scenario == "redis-hang":
        # Fail fast: a request gets its 503 within about a second, /readyz answers within its 2 s checks.
        assert faults.timings["POST status during the hang"] == 503
        assert faults.timings["POST answered during the hang after (s)"] <= 1.5, faults.timings
        assert faults.timings["/readyz answered during the hang after (s)"] <= 3, faults.timings
    if scenario == "backend-restart-on-time":
        assert faults.on_time, faults.timings
    if scenario == "poison-messages":
        # Each deployment dead-letters each poison message once, and says it was the one.
        assert faults.dead_letters == {"function": 3, "challenger": 3}, faults.dead_letters
    if scenario == "failed-cold-starts":
        assert faults.timings["cold starts that failed naming the serving form"] == 3, faults.timings
        assert faults.timings["folders left in the instances' /tmp"] == 0, faults.timings


def test_the_emulators_dead_streams_do_not_delay_the_backends_results(faults):
    """The reproduction on plain clients: after two listeners are killed, a new one gets every result on
    time with the mode the backend uses on the emulator (unary Pulls). On streaming pull the emulator
    delivered 8-16 of 32 to the dead streams, 20 s late: `benchmarks/fault_bench.py --reproduce` shows both."""
    outcome = dead_subscribers_reproduction(faults, "unary")
    print(outcome)
    assert outcome["on_time"] == outcome["results"], outcome
