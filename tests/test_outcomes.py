"""Outcomes against real services: the outcome API on the machine's Redis (two replicas sharing it) and the
Pub/Sub emulator; live figures against a hand computation; the shadow's answers reaching the rides;
the completed rides filed into the emulated bucket and read by the live-quality flow."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
from conftest import REDIS_URL, IdleListener, unique
from google.cloud import pubsub_v1

from backend.app import create_app
from backend.results import InMemoryResultStore, RedisResultStore
from backend.settings import BackendSettings
from backend.stream import RidePublisher
from devstack.pubsub import ensure_subscription, ensure_topic, pull_messages
from ride_contract.outcome import CompletedRide
from ride_contract.ride import Ride

pytestmark = pytest.mark.integration

RIDE = {"datetime": "2021-03-04 18:59:00", "PULocationID": 196, "DOLocationID": 28, "trip_distance": 2.5}


@pytest.fixture
def outcome_topic(emulators):
    topic = unique("outcomes")
    ensure_topic(emulators.project, topic)
    ensure_subscription(emulators.project, topic, topic + "-sub")
    return topic


def _settings(emulators, **overrides) -> BackendSettings:
    # Outcomes at once after the POST: the time compression of a test (tests/test_backend.py checks the 60 s rule).
    base = {**BackendSettings.from_env().__dict__, "project_id": emulators.project, "outcome_earliest_seconds": 0}
    return BackendSettings(**{**base, **overrides})


def _replica(emulators, store, outcome_topic: str, **kwargs):
    """A backend replica whose rides go nowhere (the test answers them itself) and whose outcomes go to the emulator."""
    push = unique("push")
    ensure_topic(emulators.project, push)
    settings = _settings(emulators, push_topic=push, outcome_topic=outcome_topic)
    app = create_app(settings, store=store, listener=IdleListener(), **kwargs)
    return app


def _answer(store, ride_id: str, minutes: float, version: str, ride: dict = RIDE, **ride_range: float) -> None:
    """The function's result for the ride (with ``duration_low``/``duration_high``, if given), stored as the listener stores it."""
    fingerprint = Ride.model_validate(ride).fingerprint()
    result = {"ride_id": ride_id, "duration_final": minutes, "model_run_id": f"run-{version}", "model_version": version}
    result.update(ride_range)
    assert store.complete(ride_id, {**result, "ride_fingerprint": fingerprint}) == "stored"


def test_the_outcome_api_refuses_every_bad_input_and_loses_nothing(emulators, redis_prefix, outcome_topic):
    store = RedisResultStore(REDIS_URL, ttl_seconds=60, prefix=redis_prefix)
    app = _replica(emulators, store, outcome_topic)
    client = app.test_client()
    try:
        asked = client.post("/predict", json=RIDE).get_json()
        ride_id, token = asked["ride_id"], asked["outcome_token"]
        _answer(store, ride_id, 14.0, "2")
        url = f"/rides/{ride_id}/outcome"

        def post(outcome: dict):
            return client.post(url, json={**outcome, "outcome_token": token})

        bad = {
            "no JSON": (client.post(url, data="22", content_type="text/plain"), None),
            "not an object": (client.post(url, json=[22]), "outcome"),
            "neither field": (post({}), "outcome"),
            "both fields": (post({"duration_minutes": 9, "dropoff_datetime": "2021-03-04 19:08:00"}), "outcome"),
            "unknown field": (post({"minutes": 9}), "minutes"),
            "not a time": (post({"dropoff_datetime": "soon"}), "dropoff_datetime"),
            "drop-off before pickup": (post({"dropoff_datetime": "2021-03-04 18:40:00"}), "dropoff_datetime"),
            "under a minute": (post({"dropoff_datetime": "2021-03-04 18:59:30"}), "dropoff_datetime"),
            "over an hour": (post({"duration_minutes": 75}), "duration_minutes"),
            "not a number": (post({"duration_minutes": "nine"}), "duration_minutes"),
        }
        for case, (response, field) in bad.items():
            assert response.status_code == 400, (case, response.get_json())
            if field:
                assert field in response.get_json()["fields"], (case, response.get_json())
        unknown = client.post("/rides/no-such-ride/outcome", json={"duration_minutes": 9, "outcome_token": token})
        assert unknown.status_code == 404 and unknown.get_json()["ride_id"] == "no-such-ride"
        forged = client.post(url, json={"duration_minutes": 9})  # valid, but without the ride's token
        assert forged.status_code == 403
        assert "actual_minutes" not in store.get(ride_id)  # none of that was kept
        assert pull_messages(emulators.project, outcome_topic + "-sub", 1, timeout=2) == []

        first = post({"dropoff_datetime": "2021-03-04 19:11:30"})  # 12.5 min after the pickup
        assert first.status_code == 200 and first.get_json()["outcome"] == "recorded", first.get_json()
        assert first.get_json()["actual_minutes"] == 12.5
        again = post({"duration_minutes": 12.5})  # the same outcome, the other way: a repeat
        assert again.status_code == 200 and again.get_json()["outcome"] == "same"
        other = post({"duration_minutes": 20})
        assert other.status_code == 409 and other.get_json()["actual_minutes"] == 12.5
        [message] = pull_messages(emulators.project, outcome_topic + "-sub", 2, timeout=3)  # published once
        completed = CompletedRide.model_validate_json(message.data)
        assert (completed.ride_id, completed.actual_minutes, completed.duration_final, completed.model_version) == (
            ride_id, 12.5, 14.0, "2",
        )  # fmt: skip
        assert completed.fingerprint == Ride.model_validate(RIDE).fingerprint() and completed.ride["PULocationID"] == 196
        # Counted once, however often it was sent.
        assert app.test_client().get("/readyz").get_json()["live_quality"]["models"]["final v2"]["rides"] == 1
    finally:
        app.extensions["ridestream"]["redelivery"].stop()


def test_an_outcome_the_store_or_the_stream_did_not_take_is_a_503_and_its_retry_lands_it(emulators, redis_prefix):
    with socket.socket() as sock:  # a Redis nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = RedisResultStore(f"redis://127.0.0.1:{sock.getsockname()[1]}/0", ttl_seconds=60, prefix="nobody")
    down = _replica(emulators, dead, unique("unused"))
    response = down.test_client().post("/rides/some-ride/outcome", json={"duration_minutes": 9, "outcome_token": "t"})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    down.extensions["ridestream"]["redelivery"].stop()

    # The outcomes topic does not exist yet (a stream outage): the outcome is kept, the client told to retry.
    topic = unique("outcomes-later")
    store = RedisResultStore(REDIS_URL, ttl_seconds=60, prefix=redis_prefix)
    publisher = RidePublisher(emulators.project, topic, timeout=2)
    app = _replica(emulators, store, topic, outcome_publisher=publisher)
    client = app.test_client()
    try:
        asked = client.post("/predict", json=RIDE).get_json()
        ride_id, outcome = asked["ride_id"], {"duration_minutes": 12.5, "outcome_token": asked["outcome_token"]}
        _answer(store, ride_id, 14.0, "2")
        refused = client.post(f"/rides/{ride_id}/outcome", json=outcome)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert store.get(ride_id)["actual_minutes"] == 12.5 and store.get(ride_id)["outcome_published"] is False
        ensure_topic(emulators.project, topic)
        ensure_subscription(emulators.project, topic, topic + "-sub")
        retried = client.post(f"/rides/{ride_id}/outcome", json=outcome)
        assert retried.status_code == 200 and retried.get_json()["outcome"] == "same"
        [message] = pull_messages(emulators.project, topic + "-sub", 1, timeout=5)
        assert json.loads(message.data)["ride_id"] == ride_id and store.get(ride_id)["outcome_published"] is True
        assert client.get("/readyz").get_json()["live_quality"]["models"]["coarse"]["rides"] == 1  # counted once
    finally:
        app.extensions["ridestream"]["redelivery"].stop()


def test_live_figures_across_replicas_match_a_hand_computation_and_the_shadow_answers_are_counted(
    emulators, redis_prefix, outcome_topic
):
    """Two replicas share Redis; the shadow's answers come through the emulator to whichever replica pulls
    them; outcomes go to either replica. Every model's figures equal numpy's over the same rides."""
    shadow_topic = unique("shadow")
    ensure_topic(emulators.project, shadow_topic)
    ensure_subscription(emulators.project, shadow_topic, shadow_topic + "-backend")
    settings = {"shadow_subscription": shadow_topic + "-backend", "result_pull": "unary"}
    replicas = []
    for _ in range(2):
        store = RedisResultStore(REDIS_URL, ttl_seconds=60, prefix=redis_prefix)
        push = unique("push")
        ensure_topic(emulators.project, push)
        app_settings = _settings(emulators, push_topic=push, outcome_topic=outcome_topic, **settings)
        replicas.append((create_app(app_settings, store=store, listener=IdleListener()), store))
    clients = [app.test_client() for app, _ in replicas]
    store = replicas[0][1]
    rng = np.random.default_rng(7)
    rides = [{**RIDE, "trip_distance": float(d)} for d in range(1, 31)]
    final, shadow, actual = rng.uniform(5, 40, 30).round(2), rng.uniform(5, 40, 30).round(2), rng.uniform(5, 40, 30).round(2)
    low, high = (final - rng.uniform(0, 20, 30)).round(2).clip(1), (final + rng.uniform(0, 20, 30)).round(2)
    publisher = pubsub_v1.PublisherClient()
    try:
        ids, tokens, coarse = [], [], []
        for i, ride in enumerate(rides):
            body = clients[i % 2].post("/predict", json=ride).get_json()
            ids.append(body["ride_id"])
            tokens.append(body["outcome_token"])
            coarse.append(body["duration_coarse"])
            _answer(store, body["ride_id"], float(final[i]), "2", ride, duration_low=float(low[i]), duration_high=float(high[i]))
            answer = {
                "ride_id": body["ride_id"], "duration_final": float(shadow[i]), "model_run_id": "run-3",
                "model_version": "3", "ride_fingerprint": Ride.model_validate(ride).fingerprint(),
            }  # fmt: skip
            publisher.publish(publisher.topic_path(emulators.project, shadow_topic), json.dumps(answer).encode()).result(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all("shadow" in (store.get(i) or {}) for i in ids):
            time.sleep(0.2)
        assert all(
            store.get(i)["shadow"] == {"3": {"duration_final": float(shadow[n]), "model_run_id": "run-3", "clipped": False}}
            for n, i in enumerate(ids)
        )
        for i, ride_id in enumerate(ids):
            outcome = {"duration_minutes": float(actual[i]), "outcome_token": tokens[i]}
            response = clients[(i + 1) % 2].post(f"/rides/{ride_id}/outcome", json=outcome)
            assert response.status_code == 200, response.get_json()
        live = clients[0].get("/readyz").get_json()["live_quality"]
        assert live == clients[1].get("/readyz").get_json()["live_quality"]  # one shared view

        def expected(answers) -> dict:
            errors = np.asarray(answers) - actual
            return {
                "rides": 30,
                "rmse": round(float(np.sqrt(np.mean(errors**2))), 3),
                "mae": round(float(np.mean(np.abs(errors))), 3),
                "bias": round(float(np.mean(errors)), 3),
            }

        for model, answers in (("coarse", coarse), ("shadow v3", shadow)):
            assert live["models"][model] == pytest.approx(expected(answers), abs=0.001), model
        # The final came with a range: its coverage is the share of rides that ended within it.
        inside = (actual >= low) & (actual <= high)
        assert 5 <= inside.sum() <= 25  # the check below can tell coverage from 0 or 1
        ranged = {"ranged": 30, "coverage": round(float(inside.mean()), 3), "mean_width": round(float(np.mean(high - low)), 2)}
        assert live["models"]["final v2"] == pytest.approx({**expected(final), **ranged}, abs=0.001)
    finally:
        for app, _ in replicas:
            app.extensions["ridestream"]["redelivery"].stop()
            app.extensions["ridestream"]["shadow_listener"].stop()


def test_the_in_memory_store_keeps_the_same_figures():
    """The embedded default (one process) computes what Redis does."""
    store = InMemoryResultStore()
    fingerprint = Ride.model_validate(RIDE).fingerprint()
    record = {
        "ride_id": "r1",
        "status": "pending",
        "duration_coarse": 10.0,
        "fingerprint": fingerprint,
        "ride": RIDE,
        "requested_at": 0,
    }
    store.create("r1", record, resend_at=0)
    store.complete(
        "r1",
        {"ride_id": "r1", "duration_final": 13.0, "model_run_id": "r", "model_version": "1", "ride_fingerprint": fingerprint},
    )
    assert store.add_shadow("r1", {"duration_final": 11.0, "model_version": "2", "ride_fingerprint": "other"}) == "mismatch"
    assert store.add_shadow("r1", {"duration_final": 11.0, "model_version": "2", "ride_fingerprint": fingerprint}) == "stored"
    assert store.add_shadow("r1", {"duration_final": 11.0, "model_version": "2", "ride_fingerprint": fingerprint}) == "settled"
    now = time.time()
    assert store.record_outcome("r1", 12.0, now)[0] == "recorded"
    assert store.record_outcome("r1", 12.0, now)[0] == "same" and store.record_outcome("r1", 15.0, now)[0] == "conflict"
    models = store.quality(now, 3600)["models"]
    assert models == {
        "coarse": {"rides": 1, "rmse": 2.0, "mae": 2.0, "bias": -2.0},
        "final v1": {"rides": 1, "rmse": 1.0, "mae": 1.0, "bias": 1.0},
        "shadow v2": {"rides": 1, "rmse": 1.0, "mae": 1.0, "bias": -1.0},
    }
    assert store.quality(now + 7200, 3600)["models"] == {}  # out of the window
