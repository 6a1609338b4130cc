"""The whole loop on one machine: real emulators, the function under functions-framework behind a push
subscription, two gunicorn backend replicas sharing Redis, real March 2021 rides."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import requests
from conftest import DATA, REDIS_URL, assert_runs_as_shipped, forget_redis_keys
from google.cloud import pubsub_v1

from devstack.deployables import BACKEND, FUNCTION
from devstack.processes import pid_alive
from devstack.pubsub import pull_messages
from devstack.stack import ARTIFACT_ROOT, PROJECT, SUBSCRIPTIONS, TOPICS, Stack
from devstack.traffic import real_rides, stream, summarize
from training import registry
from training.settings import Settings
from training.train import TrainConfig, train

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-stack")
    stack = Stack(tmp / "stack")
    patch = pytest.MonkeyPatch()
    try:
        stack.start_emulators()
        stack.ensure_topology()
        for name, value in stack.env().items():
            patch.setenv(name, value)
        backend_settings = {
            "PUBLISH_TIMEOUT_SECONDS": "3",  # a publish to the stopped emulator gives up quickly
            "RESEND_AFTER_SECONDS": "10",  # and publish again what the dead emulator took with it
        }
        settings = Settings(f"sqlite:///{tmp / 'mlflow.db'}", "ride-duration", ARTIFACT_ROOT, "ride-duration", str(DATA))
        first = train(TrainConfig(trials=1, sample=20_000), settings)
        registry.promote(first.version, settings)
        stack.start_function(first.run_id, first.version)
        stack.start_backends(2, redis_url=REDIS_URL, settings=backend_settings)  # keys under a prefix of this stack's own
        yield stack, settings, first
    finally:
        stack.stop_all()
        patch.undo()
        if "pubsub" in stack.ports:  # leave nothing of this stack's in the machine's Redis (it would live a day)
            forget_redis_keys(stack.redis_prefix)


def test_rides_get_coarse_now_and_the_production_model_final_through_the_stream(live):
    stack, _, first = live
    outcomes = stream(stack.backend_urls, real_rides(120, seed=5), concurrency=12)
    summary = summarize(outcomes)
    assert summary["lost"] == 0, summary
    assert {o.model_run_id for o in outcomes} == {first.run_id}
    assert summary["rmse_final"] < summary["rmse_coarse"]
    # Each final came with its range through the stream, and about 4 in 5 real rides ended within it
    # (120 rides: 0.8 give or take 0.04; the band is 3.5 of those either side).
    assert all(o.duration_low <= o.duration_final <= o.duration_high for o in outcomes)
    assert 0.65 <= summary["within_range"] <= 0.93, summary
    # Two replicas took the rides; each result was read back from the other (traffic.stream does that).
    assert len(stack.backend_urls) == 2


def test_the_function_and_the_backends_run_from_what_they_ship(live):
    """Each from an environment with its own requirements only: pandas and MLflow, which the development venv
    has, are not there; nor is repository code its upload or image does not copy."""
    stack, _, _ = live
    assert_runs_as_shipped(stack.pids["function"], FUNCTION, runs="main", lacks=("pandas", "mlflow", "ride_contract"))
    for key in ("backend-0", "backend-1"):
        assert_runs_as_shipped(stack.pids[key], BACKEND, runs="backend.app", lacks=("pandas", "mlflow", "training", "devstack"))


def test_poison_messages_end_in_the_dead_letter_topic(live):
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(PROJECT, TOPICS["push"])
    bad = [b"not json at all", json.dumps({"datetime": "2021-03-01 10:00:00", "PULocationID": 7}).encode()]
    for data in bad:
        publisher.publish(topic, data).result(timeout=10)
    dead = [json.loads(m.data) for m in pull_messages(PROJECT, SUBSCRIPTIONS["dead"], len(bad), timeout=60)]
    assert len(dead) == len(bad)
    reasons = " | ".join(d["reason"] for d in dead)
    assert "not JSON" in reasons and "DOLocationID" in reasons and "trip_distance" in reasons


def test_pubsub_outage_mid_stream_is_reported_and_loses_no_ride(live):
    stack, _, _ = live
    backend = stack.backend_urls[0]
    rides = real_rides(80, seed=6)
    outcomes: list = []
    # Clients keep sending (and retry what is refused) while the emulator goes down and comes back.
    clients = threading.Thread(
        target=lambda: outcomes.extend(stream(stack.backend_urls, rides, concurrency=4, final_timeout=150))
    )
    clients.start()
    time.sleep(2)

    stack.stop("pubsub")
    ready = requests.get(f"{backend}/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["checks"]["push_stream"] != "ok"
    # Accepted all the same: recorded in the outbox, published once the stream is back.
    during = requests.post(f"{backend}/predict", json=rides[0][0], timeout=30)
    assert during.status_code == 202 and during.json()["status"] == "pending", during.json()
    time.sleep(3)

    stack.restart("pubsub")  # the emulator keeps nothing: restart() creates the topics and subscriptions again
    for _ in range(60):
        if requests.get(f"{backend}/readyz", timeout=30).status_code == 200:
            break
        time.sleep(1)
    else:
        pytest.fail("the backend did not report ready after the emulator came back")

    clients.join(timeout=240)
    final = requests.get(f"{backend}/rides/{during.json()['ride_id']}?wait=10", timeout=30).json()
    assert final["status"] == "done", final
    summary = summarize(outcomes)
    # Rides refused during the outage were retried; rides the dead emulator held were published again.
    assert summary["rides"] == len(rides) and summary["lost"] == 0, summary


def test_the_bucket_keeps_the_models_across_a_storage_emulator_restart(live):
    stack, _, first = live
    stack.restart("storage")
    # A new instance's cold start reads the model from the restarted bucket.
    stack.redeploy_function(first.run_id, first.version)
    summary = summarize(stream(stack.backend_urls, real_rides(20, seed=9)))
    assert summary["lost"] == 0 and summary["model_versions"] == [first.version]


def test_redeploy_starts_a_dead_function_again_even_when_the_model_is_unchanged(live, monkeypatch):
    import argparse
    import os
    import signal

    from devstack.__main__ import redeploy

    stack, settings, first = live
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    os.killpg(stack.pids["function"], signal.SIGKILL)
    while pid_alive(stack.pids["function"]):  # SIGKILL lands asynchronously: the crash is over before anyone redeploys
        time.sleep(0.05)
    assert redeploy(argparse.Namespace(stack_dir=stack.dir)) == 0  # what `make redeploy` runs
    stack.refresh()  # that command is another view of the stack: take over what it started
    summary = summarize(stream(stack.backend_urls, real_rides(10, seed=11)))
    assert summary["lost"] == 0 and summary["model_versions"] == [first.version]


def test_promote_and_redeploy_switches_the_model_the_rides_carry(live):
    stack, settings, first = live
    second = train(TrainConfig(trials=1, sample=10_000), settings)
    registry.promote(second.version, settings)
    production = registry.resolve(registry.PRODUCTION, settings)
    assert production.run_id == second.run_id != first.run_id

    stack.redeploy_function(production.run_id, production.version)
    outcomes = stream(stack.backend_urls, real_rides(20, seed=7), concurrency=4)
    assert summarize(outcomes)["lost"] == 0
    assert {(o.model_run_id, o.model_version) for o in outcomes} == {(second.run_id, second.version)}


def test_a_deployment_that_cannot_start_leaves_the_old_model_serving(live):
    from devstack.processes import ServiceError

    stack, _, _ = live
    serving_pid, serving_version = stack.pids["function"], stack.model["version"]
    with pytest.raises(ServiceError, match="no model logged by run"):
        stack.deploy_function("0" * 32, "99")  # a version whose model the bucket does not have
    assert stack.pids["function"] == serving_pid and stack.model["version"] == serving_version
    summary = summarize(stream(stack.backend_urls, real_rides(20, seed=13)))
    assert summary["lost"] == 0 and summary["model_versions"] == [serving_version]


def test_the_shadow_challenger_answers_every_ride_but_never_reaches_the_riders(live):
    stack, settings, _ = live
    challenger = train(TrainConfig(trials=1, sample=8_000), settings)
    stack.start_function(challenger.run_id, challenger.version, key="challenger")
    try:
        outcomes = stream(stack.backend_urls, real_rides(30, seed=17), concurrency=6)
        summary = summarize(outcomes)
        production = stack.model["version"]
        # Riders only ever see production's answers, though the challenger answered every ride too.
        assert summary["lost"] == 0 and summary["model_versions"] == [production] != [challenger.version]
        shadow = [json.loads(m.data) for m in pull_messages(PROJECT, SUBSCRIPTIONS["shadow_results"], count=30, timeout=60)]
        assert {r["ride_id"] for r in shadow} == {o.ride_id for o in outcomes}
        assert {r["model_version"] for r in shadow} == {challenger.version}
        for url in stack.backend_urls:
            readiness = requests.get(f"{url}/readyz", timeout=10).json()
            assert readiness["model_served"]["model_version"] == production
    finally:
        stack.stop("challenger")


def test_the_live_view_shows_the_streams_figures_the_dead_letters_and_the_models(live, monkeypatch):
    import io

    from rich.console import Console

    from devstack.watch import watch

    stack, settings, _ = live
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    publisher = pubsub_v1.PublisherClient()
    publisher.publish(publisher.topic_path(PROJECT, TOPICS["push"]), b"{not a ride").result(timeout=30)
    assert summarize(stream(stack.backend_urls, real_rides(30, seed=19), concurrency=6))["lost"] == 0

    # The figures cover the last minute, so an earlier test's final may leave the window between the
    # last frame and the look-up below: then the view is asked again.
    # Each view counts the dead letters from its start: the first one saw them.
    first_frame = None
    for _ in range(3):
        console = Console(file=io.StringIO(), width=120, height=60, force_terminal=True, color_system=None, record=True)
        # Three frames, however long a busy machine takes to draw them (a view of 4 s drew only 2 under load).
        assert watch(stack, console, frames=3) == 3
        frame = console.export_text().rsplit("stream (all replicas, last minute)", 1)[1]  # the last one drawn
        first_frame = first_frame or frame
        figures = requests.get(f"{stack.backend_urls[0]}/readyz", timeout=10).json()["stream"]
        if f"{figures['latency_ms_p50']} ms" in frame and f"{figures['latency_ms_p95']} ms" in frame:
            break
    assert f"{figures['latency_ms_p50']} ms" in frame and f"{figures['latency_ms_p95']} ms" in frame
    assert figures["finals_in_window"] >= 30 and figures["pending_rides"] == 0
    assert "not JSON" in first_frame  # the dead letter's reason
    assert re.search(r"dead letters by source: .*\bfunction \d+", first_frame)  # which deployment refused them
    production = stack.model["version"]
    assert f"v{production}" in frame and f"production = v{production}" in frame and "MISMATCH" not in frame
