"""Backend API with a recording publisher, an in-memory store and a stand-in listener: validation and correlation."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading

import pytest
from conftest import REPO, IdleListener

from backend.app import create_app
from backend.results import Completion, InMemoryResultStore, StoreUnavailable
from backend.settings import BackendSettings
from backend.stream import PublishError
from ride_contract.coarse import CoarseEstimator
from ride_contract.ride import Ride

RIDE = {"datetime": "2022-06-23 11:36:42", "PULocationID": 34, "DOLocationID": 56, "trip_distance": 12}


def answer(ride_id: str, minutes: float, ride: dict = RIDE, **extra) -> dict:
    """The function's result for ``ride``, as it publishes it (naming the ride by its fingerprint)."""
    fingerprint = Ride.model_validate(ride).fingerprint()
    return {"ride_id": ride_id, "duration_final": minutes, "model_run_id": "r", "ride_fingerprint": fingerprint, **extra}


class RecordingPublisher:
    def __init__(self):
        self.sent: list[tuple[dict, dict]] = []
        self.fail = False

    def publish(self, data: bytes, **attributes: str) -> None:
        if self.fail:
            raise PublishError("could not publish: emulator down")
        self.sent.append((json.loads(data), attributes))

    def check(self, timeout: float) -> None:
        if self.fail:
            raise ConnectionError("emulator down")


def settings(**overrides) -> BackendSettings:
    base = BackendSettings.from_env()
    return BackendSettings(**{**base.__dict__, "max_wait_seconds": 5, **overrides})


def backend_app(store, publisher=None, config: BackendSettings | None = None, **wiring):
    """The app on test doubles: ``store``, a recording publisher unless one is given, no result listener, and
    outcomes recorded (``wiring``: another outcome_publisher, a clock)."""
    wiring.setdefault("outcome_publisher", RecordingPublisher())
    return create_app(
        config or settings(), publisher=publisher or RecordingPublisher(), store=store, listener=IdleListener(), **wiring
    )


@pytest.fixture
def backend():
    publisher, store = RecordingPublisher(), InMemoryResultStore()
    return backend_app(store, publisher).test_client(), publisher, store


def coarse_model() -> CoarseEstimator:
    return CoarseEstimator.from_dict(json.loads((REPO / "backend/coarse_model.json").read_text()))


def test_valid_ride_gets_coarse_estimate_and_is_published_with_its_ride_id(backend):
    client, publisher, _ = backend
    response = client.post("/predict", json=RIDE)
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "pending" and len(body["ride_id"]) == 32
    # The coarse estimate is the fitted per-hour line at 11:36 for 12 miles, not a constant.
    model = coarse_model()
    assert body["duration_coarse"] == pytest.approx(model.intercepts[11] + model.slopes[11] * 12, abs=0.01)
    [(published, attributes)] = publisher.sent
    assert published == {**RIDE, "datetime": "2022-06-23T11:36:42", "ride_id": body["ride_id"]}
    assert attributes == {"ride_id": body["ride_id"]}
    assert response.headers["Location"] == f"/rides/{body['ride_id']}"


def test_result_from_the_stream_is_served_by_ride_id(backend):
    client, _, store = backend
    ride_id = client.post("/predict", json=RIDE).get_json()["ride_id"]
    assert client.get(f"/rides/{ride_id}").get_json()["status"] == "pending"
    store.complete(ride_id, answer(ride_id, 31.5, model_version="2"))
    body = client.get(f"/rides/{ride_id}").get_json()
    assert body["status"] == "done" and body["duration_final"] == 31.5 and "duration_coarse" in body


def test_wait_returns_the_final_duration_when_it_arrives_in_time(backend):
    client, publisher, store = backend

    def answer_soon():
        while not publisher.sent:
            threading.Event().wait(0.01)
        ride_id = publisher.sent[0][0]["ride_id"]
        threading.Event().wait(0.2)
        store.complete(ride_id, answer(ride_id, 17.0, model_version="1"))

    threading.Thread(target=answer_soon).start()
    response = client.post("/predict?wait=3", json=RIDE)
    assert response.status_code == 200 and response.get_json()["duration_final"] == 17.0


def test_wait_times_out_as_pending(backend):
    client, _, _ = backend
    response = client.post("/predict?wait=0.3", json=RIDE)
    assert response.status_code == 202 and response.get_json()["status"] == "pending"


def test_concurrent_requests_each_get_their_own_result(backend):
    client, publisher, store = backend
    rides = [{**RIDE, "trip_distance": float(i + 1)} for i in range(20)]
    responses: dict[float, dict] = {}

    def stand_in_consumer():  # answers each ride with 3 min/mile, in reverse order of arrival
        answered = 0
        while answered < len(rides):
            pending = publisher.sent[answered:]
            for ride, _ in reversed(pending):
                ride_id = ride.pop("ride_id")
                store.complete(ride_id, answer(ride_id, ride["trip_distance"] * 3, ride))
            answered += len(pending)
            threading.Event().wait(0.01)

    def request(ride):
        responses[ride["trip_distance"]] = client.post("/predict?wait=5", json=ride).get_json()

    consumer = threading.Thread(target=stand_in_consumer)
    consumer.start()
    threads = [threading.Thread(target=request, args=(r,)) for r in rides]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    consumer.join(timeout=10)
    assert len({r["ride_id"] for r in responses.values()}) == len(rides)
    for distance, body in responses.items():
        assert body["duration_final"] == distance * 3


def test_client_ride_id_is_kept_and_a_retry_of_the_same_ride_gets_its_record(backend):
    client, publisher, store = backend
    first = client.post("/predict", json={**RIDE, "ride_id": "app-42"})
    assert first.status_code == 202 and first.get_json()["ride_id"] == "app-42"
    retry = client.post("/predict", json={**RIDE, "ride_id": "app-42"})
    assert retry.status_code == 202 and retry.get_json() == first.get_json()
    store.complete("app-42", answer("app-42", 9.0))
    done = client.post("/predict", json={**RIDE, "ride_id": "app-42"})
    assert done.status_code == 200 and done.get_json()["duration_final"] == 9.0
    assert len(publisher.sent) == 1  # retries publish nothing: the ride is in the stream or due a resend


def test_a_reused_ride_id_with_another_ride_is_409(backend):
    client, publisher, _ = backend
    assert client.post("/predict", json={**RIDE, "ride_id": "app-43"}).status_code == 202
    other = client.post("/predict", json={**RIDE, "ride_id": "app-43", "trip_distance": 30})
    assert other.status_code == 409 and "another ride" in other.get_json()["error"]
    assert len(publisher.sent) == 1


def test_a_ride_the_stream_does_not_take_stays_recorded_and_the_outbox_publishes_it(backend):
    from backend.stream import Redelivery

    client, publisher, store = backend
    client.application.extensions["ridestream"]["redelivery"].stop()  # this test sweeps by itself
    publisher.fail = True
    response = client.post("/predict", json=RIDE)
    # Accepted all the same: the ride is recorded (the outbox), not forgotten.
    assert response.status_code == 202 and response.get_json()["status"] == "pending"
    ride_id = response.get_json()["ride_id"]
    assert store.get(ride_id)["status"] == "pending" and store.publishes(ride_id) == 0
    assert client.get("/readyz").status_code == 503
    redelivery = Redelivery(publisher, store, after_seconds=30, max_attempts=5, retry_seconds=0)
    store.reschedule(ride_id, 0)  # due now (the POST made it due in PUBLISH_RETRY_SECONDS)
    redelivery.sweep()  # the broker is still down: due again soon, and no publish counted
    assert store.publishes(ride_id) == 0 and publisher.sent == []
    publisher.fail = False
    redelivery.sweep()
    assert [attrs["ride_id"] for _, attrs in publisher.sent] == [ride_id]
    assert store.publishes(ride_id) == 1 and redelivery.recovered == 1 and redelivery.resent == 0
    assert client.get("/readyz").get_json()["ready"] is True


def test_a_retry_of_a_ride_not_yet_in_the_stream_publishes_it(backend):
    client, publisher, store = backend
    publisher.fail = True
    assert client.post("/predict", json={**RIDE, "ride_id": "unsent"}).status_code == 202
    publisher.fail = False
    retry = client.post("/predict", json={**RIDE, "ride_id": "unsent"})
    assert retry.status_code == 202 and [attrs["ride_id"] for _, attrs in publisher.sent] == ["unsent"]
    assert store.publishes("unsent") == 1
    client.post("/predict", json={**RIDE, "ride_id": "unsent"})  # in the stream now: nothing more
    assert len(publisher.sent) == 1


class HangingPublisher(RecordingPublisher):
    """The first publish hangs until released, then fails (Pub/Sub paused, then its deadline)."""

    def __init__(self):
        super().__init__()
        self.hanging = threading.Event()
        self.release = threading.Event()

    def publish(self, data: bytes, **attributes: str) -> None:
        if not self.hanging.is_set():
            self.hanging.set()
            self.release.wait(10)
            raise PublishError("deadline exceeded")
        super().publish(data, **attributes)


def test_a_retry_while_the_first_publish_hangs_is_not_lost_when_that_publish_fails():
    # Two replicas share one store; the client gives up on the first and retries on the second.
    publisher, store = HangingPublisher(), InMemoryResultStore()
    first = backend_app(store, publisher).test_client()
    second = backend_app(store, publisher).test_client()
    ride = {**RIDE, "ride_id": "raced"}
    hung = threading.Thread(target=lambda: first.post("/predict", json=ride))
    hung.start()
    assert publisher.hanging.wait(5)
    retry = second.post("/predict", json=ride)
    assert retry.status_code == 202 and [attrs["ride_id"] for _, attrs in publisher.sent] == ["raced"]
    publisher.release.set()  # now the first request's publish fails
    hung.join(10)
    assert store.get("raced")["status"] == "pending"  # still there: its result can land
    assert store.complete("raced", answer("raced", 12.5)) == Completion.STORED
    assert second.get("/rides/raced").get_json()["duration_final"] == 12.5


class WaitRecordingStore(InMemoryResultStore):
    """The in-memory store, noting how long each long poll was allowed to wait."""

    def __init__(self):
        super().__init__()
        self.waits: list[float] = []

    def wait(self, ride_id: str, timeout: float):
        self.waits.append(timeout)
        return super().wait(ride_id, timeout)


def test_a_posts_wait_counts_the_time_its_publish_took_so_a_hanging_stream_never_doubles_it():
    # Pub/Sub hangs: each publish takes most of (then all of) the publish timeout on the backend's clock, then fails.
    now = [1_000.0]
    publish_seconds = [9.5, 12.0]

    class SlowPublisher(RecordingPublisher):
        def publish(self, data: bytes, **attributes: str) -> None:
            now[0] += publish_seconds.pop(0)
            raise PublishError("deadline exceeded")

    store = WaitRecordingStore()
    client = backend_app(store, SlowPublisher(), settings(max_wait_seconds=10), clock=lambda: now[0]).test_client()
    # 9.5 s of the rider's 10 went on the publish: half a second of waiting is left, not another 10.
    first = client.post("/predict?wait=10", json={**RIDE, "ride_id": "slow"})
    assert first.status_code == 202 and store.waits == [pytest.approx(0.5)]
    # A publish longer than the wait: answered at once, the ride recorded (the outbox publishes it again).
    second = client.post("/predict?wait=10", json={**RIDE, "ride_id": "slower"})
    assert second.status_code == 202 and store.waits == [pytest.approx(0.5)]
    assert store.get("slower")["status"] == "pending"


def test_a_failed_ride_asked_again_with_its_own_ride_id_is_tried_afresh(backend):
    client, publisher, store = backend
    client.post("/predict", json={**RIDE, "ride_id": "unlucky"})
    store.complete("unlucky", {"ride_id": "unlucky", "error": "no final duration after 5 publishes"}, status="failed")
    again = client.post("/predict", json={**RIDE, "ride_id": "unlucky"})
    assert again.status_code == 202 and again.get_json()["status"] == "pending" and "error" not in again.get_json()
    assert [attrs["ride_id"] for _, attrs in publisher.sent] == ["unlucky", "unlucky"]
    assert store.publishes("unlucky") == 1
    assert store.complete("unlucky", answer("unlucky", 8.0)) == Completion.STORED
    # Another ride under the failed ride's id is still refused.
    assert client.post("/predict", json={**RIDE, "ride_id": "unlucky", "trip_distance": 3}).status_code == 409


def test_get_ride_waits_for_the_final_when_asked_to(backend):
    client, _, store = backend
    ride_id = client.post("/predict", json=RIDE).get_json()["ride_id"]
    threading.Timer(0.3, lambda: store.complete(ride_id, answer(ride_id, 21.0))).start()
    assert client.get(f"/rides/{ride_id}?wait=3").get_json()["duration_final"] == 21.0
    assert client.get(f"/rides/{ride_id}?wait=abc").status_code == 400


def test_readyz_says_degraded_when_finals_arrive_late():
    from backend.app import degraded_reasons

    store = InMemoryResultStore()
    app = backend_app(store, config=settings(late_final_p95_ms=500))
    client = app.test_client()
    assert client.get("/readyz").get_json()["status"] == "ok"
    import time as clock

    for index in range(20):  # finals 2 s after their POST
        ride_id = f"late-{index}"
        store.create(
            ride_id,
            {
                "ride_id": ride_id,
                "status": "pending",
                "fingerprint": answer(ride_id, 1)["ride_fingerprint"],
                "requested_at": clock.time() - 2,
            },
            resend_at=0,
        )
        store.complete(ride_id, answer(ride_id, 10.0))
    body = client.get("/readyz").get_json()
    assert body["ready"] is True and body["status"] == "degraded" and "p95 2," in body["degraded"][0]
    assert degraded_reasons({"latency_ms_p95": 400.0}, 500) == []
    app.extensions["ridestream"]["redelivery"].stop()


class HangingStore(InMemoryResultStore):
    """Redis frozen (SIGSTOP): every call hangs."""

    def ping(self) -> None:
        threading.Event().wait(10)

    def stats(self, now: float):
        threading.Event().wait(10)


def test_readyz_answers_within_its_checks_when_the_store_hangs():
    import time as clock

    app = backend_app(HangingStore())
    started = clock.monotonic()
    response = app.test_client().get("/readyz")
    assert clock.monotonic() - started < 3
    assert response.status_code == 503 and "no answer within 2 s" in response.get_json()["checks"]["result_store"]
    app.extensions["ridestream"]["redelivery"].stop()


class DownStore(InMemoryResultStore):
    """A store whose every call fails as Redis does when it is down."""

    def __getattribute__(self, name):
        if name in ("create", "get", "wait", "complete", "claim_due", "published", "reschedule", "ping"):
            raise StoreUnavailable("Redis unavailable: ConnectionError: connection refused")
        return super().__getattribute__(name)


def test_store_outage_answers_503_with_retry_after_never_500_and_publishes_nothing():
    publisher = RecordingPublisher()
    app = backend_app(DownStore(), publisher)
    client = app.test_client()
    posted = client.post("/predict?wait=1", json=RIDE)
    assert posted.status_code == 503 and posted.headers["Retry-After"] == "1"
    assert "store is unavailable" in posted.get_json()["error"] and posted.get_json()["ride_id"]
    fetched = client.get("/rides/some-ride")
    assert fetched.status_code == 503 and fetched.headers["Retry-After"] == "1"
    assert publisher.sent == []  # a ride that is not recorded is never published
    assert client.get("/readyz").status_code == 503
    app.extensions["ridestream"]["redelivery"].stop()


def test_a_ride_answered_on_the_stream_but_never_posted_does_not_block_its_post(backend):
    client, publisher, store = backend
    # A sender published straight to the ride topic; its result arrives for a ride nobody POSTed.
    assert store.complete("direct-1", answer("direct-1", 3.0)) == "unknown"
    response = client.post("/predict", json={**RIDE, "ride_id": "direct-1"})
    assert response.status_code == 202 and response.get_json()["status"] == "pending"
    assert [attrs["ride_id"] for _, attrs in publisher.sent] == ["direct-1"]


def test_a_result_for_no_pending_ride_is_refused_not_made_into_a_ride():
    store = InMemoryResultStore()
    result = {"ride_id": "ghost", "duration_final": 9.0, "model_run_id": "r", "ride_fingerprint": "aaaa"}
    assert store.complete("ghost", result) == Completion.UNKNOWN
    assert store.get("ghost") is None

    store.create("r1", {"ride_id": "r1", "status": "pending", "fingerprint": "aaaa"}, resend_at=0)
    assert store.complete("r1", {**result, "ride_id": "r1", "ride_fingerprint": "bbbb"}) == Completion.MISMATCH
    # Fail closed: a result that does not say which ride it answers is not stored on any.
    assert store.complete("r1", {**result, "ride_id": "r1", "ride_fingerprint": ""}) == Completion.MISMATCH
    assert store.get("r1")["status"] == "pending"
    assert store.complete("r1", {**result, "ride_id": "r1", "ride_fingerprint": "aaaa"}) == Completion.STORED
    assert store.complete("r1", {**result, "ride_id": "r1", "duration_final": 1.0}) == Completion.SETTLED
    assert store.get("r1")["duration_final"] == 9.0 and store.claim_due(float("inf"), 30) == []


def test_unknown_ride_is_404(backend):
    client, _, _ = backend
    response = client.get("/rides/nope")
    assert response.status_code == 404 and "unknown" in response.get_json()["error"]


BAD_RIDES = [
    ({}, "datetime"),
    ({**RIDE, "PULocationID": 0}, "PULocationID"),
    ({**RIDE, "PULocationID": 266}, "PULocationID"),
    ({**RIDE, "DOLocationID": -5}, "DOLocationID"),
    ({**RIDE, "PULocationID": "34"}, "PULocationID"),
    ({**RIDE, "PULocationID": 34.5}, "PULocationID"),
    ({**RIDE, "PULocationID": True}, "PULocationID"),
    ({**RIDE, "PULocationID": None}, "PULocationID"),
    ({**RIDE, "trip_distance": 0}, "trip_distance"),
    ({**RIDE, "trip_distance": -3}, "trip_distance"),
    ({**RIDE, "trip_distance": 10_000}, "trip_distance"),
    ({**RIDE, "trip_distance": "12"}, "trip_distance"),
    ({**RIDE, "trip_distance": [12]}, "trip_distance"),
    ({**RIDE, "datetime": "23/06/2022 11:36"}, "datetime"),
    ({**RIDE, "datetime": "2022-13-01 00:00:00"}, "datetime"),
    ({**RIDE, "datetime": 1656000000}, "datetime"),
    ({**RIDE, "datetime": ""}, "datetime"),
    ({**RIDE, "fare_amount": 10}, "fare_amount"),
    ({**RIDE, "ride_id": "has space"}, "ride_id"),
    ({**RIDE, "ride_id": "x" * 65}, "ride_id"),
    ({**RIDE, "ride_id": 7}, "ride_id"),
    ([RIDE], "ride"),
    ("a string", "ride"),
    (42, "ride"),
]


@pytest.mark.parametrize(("payload", "field"), BAD_RIDES)
def test_bad_ride_is_400_naming_the_field_and_nothing_is_published(backend, payload, field):
    client, publisher, _ = backend
    response = client.post("/predict", json=payload)
    assert response.status_code == 400
    body = response.get_json()
    assert body["error"] == "invalid ride" and field in body["fields"]
    assert publisher.sent == []


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"", "application/json", 400),
        (json.dumps(RIDE).encode(), "text/plain", 400),
        (
            b'{"trip_distance": NaN, "datetime": "2022-06-23 11:36:42", "PULocationID": 1, "DOLocationID": 2}',
            "application/json",
            400,
        ),
        (
            b'{"trip_distance": Infinity, "datetime": "2022-06-23 11:36:42", "PULocationID": 1, "DOLocationID": 2}',
            "application/json",
            400,
        ),
        (json.dumps({**RIDE, "note": "x" * 20_000}).encode(), "application/json", 413),
    ],
)
def test_malformed_bodies_get_a_json_error_never_500(backend, body, content_type, status):
    client, publisher, _ = backend
    response = client.post("/predict", data=body, content_type=content_type)
    assert response.status_code == status
    assert response.is_json and response.get_json()["error"]
    assert publisher.sent == []


@pytest.mark.parametrize("wait", ["abc", "-1", "11", "nan"])
def test_bad_wait_parameter_is_400(backend, wait):
    client, _, _ = backend
    assert client.post(f"/predict?wait={wait}", json=RIDE).status_code == 400


def test_random_garbage_never_gives_500(backend):
    import random

    client, _, _ = backend
    rng = random.Random(7)
    values = [None, True, -1, 0, 1, 265, 266, 1e308, -1e-9, "", "x", "2021-01-01 00:00:00", [], {}, [1], {"a": 1}]
    keys = [*RIDE, "ride_id", "extra"]
    for i in range(300):  # from 300 clients: one client's 300 POSTs in a second would be refused (429) at its limit
        payload = {k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, len(keys)))}
        client_address = {"REMOTE_ADDR": f"203.0.113.{i % 250}"}
        assert client.post("/predict", json=payload, environ_overrides=client_address).status_code in (202, 400)


def _pending(store, ride_id: str, published: int = 1) -> None:
    """A recorded ride, published ``published`` times."""
    fingerprint = Ride.model_validate(RIDE).fingerprint()
    record = {"ride_id": ride_id, "status": "pending", "ride": dict(RIDE), "fingerprint": fingerprint}
    store.create(ride_id, record, resend_at=0)
    for _ in range(published):
        store.published(ride_id, resend_at=0)


def test_unanswered_rides_are_published_again_then_marked_failed():
    from backend.stream import Redelivery

    publisher, store = RecordingPublisher(), InMemoryResultStore()
    redelivery = Redelivery(publisher, store, after_seconds=0, max_attempts=3)
    for ride_id in ("lost", "answered"):
        _pending(store, ride_id)
    store.complete("answered", answer("answered", 9.0))

    redelivery.sweep()
    redelivery.sweep()
    assert [attrs["ride_id"] for _, attrs in publisher.sent] == ["lost", "lost"]  # sends 2 and 3
    # The ride itself, rebuilt from its record.
    assert Ride.model_validate(publisher.sent[0][0]) == Ride.model_validate({**RIDE, "ride_id": "lost"})
    redelivery.sweep()  # the third send was the last: no more publishing, the ride is failed
    assert len(publisher.sent) == 2
    assert store.get("lost")["status"] == "failed" and "3 publishes" in store.get("lost")["error"]
    assert store.wait("lost", timeout=1)["status"] == "failed"
    assert store.get("answered")["status"] == "done" and redelivery.resent == 2


def test_a_resend_that_cannot_publish_is_tried_again_later():
    from backend.stream import Redelivery

    publisher, store = RecordingPublisher(), InMemoryResultStore()
    redelivery = Redelivery(publisher, store, after_seconds=0, max_attempts=5, retry_seconds=0)
    _pending(store, "r")
    publisher.fail = True
    redelivery.sweep()
    assert store.publishes("r") == 1  # a publish that failed is not counted
    publisher.fail = False
    redelivery.sweep()
    assert len(publisher.sent) == 1 and redelivery.resent == 1 and store.publishes("r") == 2


def test_a_ride_the_stream_never_takes_fails_saying_so_not_after_publishes_that_never_happened():
    import time as clock

    from backend.stream import Redelivery

    publisher, store = RecordingPublisher(), InMemoryResultStore()
    redelivery = Redelivery(publisher, store, after_seconds=1, max_attempts=3, retry_seconds=0)
    # Recorded 10 s ago and never taken by the stream (more than 3 attempts x 1 s).
    fingerprint = Ride.model_validate(RIDE).fingerprint()
    record = {"ride_id": "r", "status": "pending", "ride": dict(RIDE), "fingerprint": fingerprint}
    store.create("r", {**record, "requested_at": clock.time() - 10}, resend_at=0)
    publisher.fail = True
    redelivery.sweep()
    assert store.get("r")["status"] == "failed"
    assert "did not take the ride for 10 s" in store.get("r")["error"] and publisher.sent == []


def test_a_pending_ride_whose_record_vanished_is_dropped_from_the_bookkeeping():
    from backend.stream import Redelivery

    publisher, store = RecordingPublisher(), InMemoryResultStore()
    _pending(store, "evicted")
    store._rides.pop("evicted")  # TTL or eviction (volatile-lru) removed the record, not its schedule
    assert store.stats(0)["pending_rides"] == 1
    Redelivery(publisher, store, after_seconds=0, max_attempts=5).sweep()
    assert store.stats(0)["pending_rides"] == 0 and store.claim_due(float("inf"), 30) == []


def test_a_claimed_ride_is_not_resent_by_another_replica_until_its_lease_ends():
    store = InMemoryResultStore()
    _pending(store, "r")
    assert store.claim_due(now=100, lease_seconds=30) == [("r", 1)]
    assert store.claim_due(now=110, lease_seconds=30) == []  # another replica, inside the lease
    # The lease ran out: anyone may. A claim is not a publish: the count is still 1.
    assert store.claim_due(now=131, lease_seconds=30) == [("r", 1)]


def test_failed_result_writes_back_off_exponentially_up_to_a_cap():
    from backend.stream import Backoff

    backoff = Backoff(initial=0.5, maximum=4)
    assert [backoff.failed() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    backoff.succeeded()
    assert backoff.failed() == 0.5


def test_the_backend_needs_only_its_folder_and_the_ride_contract():
    # What the image holds (backend/, ride_contract/) must be all it imports of the project,
    # and neither pandas nor scikit-learn, which the image does not install.
    code = (
        "import sys, backend.app, backend.results, backend.stream, backend.settings; "
        "print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    imported = set(ast.literal_eval(completed.stdout))
    assert {"backend", "ride_contract"} <= imported
    assert not imported & {"training", "data", "flows", "devstack", "serving_function", "pandas", "sklearn", "scipy"}


def test_thread_cpu_is_counted_for_the_selected_threads_only():
    import time

    from backend.stream import threads_cpu_seconds

    release = threading.Event()

    def busy_then_wait(seconds: float, burned: threading.Event) -> None:
        until = time.thread_time() + seconds
        while time.thread_time() < until:
            pass
        burned.set()
        release.wait()

    burned = {"Thread-LeaseMaintainer": threading.Event(), "unrelated-worker": threading.Event()}
    workers = [
        threading.Thread(target=busy_then_wait, args=(0.3, burned["Thread-LeaseMaintainer"]), name="Thread-LeaseMaintainer"),
        threading.Thread(target=busy_then_wait, args=(0.6, burned["unrelated-worker"]), name="unrelated-worker"),
    ]
    for worker in workers:
        worker.start()
    try:
        assert all(event.wait(60) for event in burned.values())
        counted = threads_cpu_seconds(lambda name: name == "Thread-LeaseMaintainer")
        both = threads_cpu_seconds(lambda name: name in burned)
    finally:
        release.set()
        for worker in workers:
            worker.join()
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert 0.3 - tick <= counted < 0.6  # its own 0.3 s, not the other thread's
    assert both >= 0.9 - 2 * tick


class Clock:
    """The backend's clock, set by the test (when rides are asked and their outcomes come)."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def outcomes():
    """A backend on a test clock; (client, its outcomes publisher, store, clock)."""
    store, outcome_publisher, clock = InMemoryResultStore(), RecordingPublisher(), Clock()
    app = backend_app(store, outcome_publisher=outcome_publisher, clock=clock)
    return app.test_client(), outcome_publisher, store, clock


def _booked(client, store, ride_id: str = "ride-1", final: float = 14.0) -> str:
    """A ride asked and answered (final v2, and the shadow v3's answer); its outcome token."""
    body = client.post("/predict", json={**RIDE, "ride_id": ride_id}).get_json()
    store.complete(ride_id, answer(ride_id, final, model_version="2"))
    assert store.add_shadow(ride_id, answer(ride_id, 11.0, model_version="3")) == Completion.STORED
    return body["outcome_token"]


def _counted_nowhere(client, store, outcome_publisher, ride_id: str) -> None:
    assert "actual_minutes" not in store.get(ride_id)  # not kept on the ride
    assert outcome_publisher.sent == []  # not published: no flow, no controller sees it
    assert client.get("/readyz").get_json()["live_quality"]["models"] == {}  # not in live quality


def test_an_outcome_without_the_rides_token_or_with_another_is_refused_and_counted_nowhere(outcomes):
    client, outcome_publisher, store, clock = outcomes
    token = _booked(client, store)
    other_token = _booked(client, store, "ride-2")
    assert len(token) >= 40 and token != other_token
    clock.now += 600  # the ride can have ended: only the token decides below
    url = "/rides/ride-1/outcome"
    forged = {
        "no token": {"duration_minutes": 14.0},
        "an empty one": {"duration_minutes": 14.0, "outcome_token": ""},
        "a wrong one": {"duration_minutes": 14.0, "outcome_token": token[:-1] + ("A" if token[-1] != "A" else "B")},
        "another ride's": {"duration_minutes": 14.0, "outcome_token": other_token},
        "not a string": {"duration_minutes": 14.0, "outcome_token": 12345},
    }
    for case, body in forged.items():
        response = client.post(url, json=body)
        assert response.status_code == 403, (case, response.get_json())
        assert "outcome_token" in response.get_json()["error"] and response.get_json()["ride_id"] == "ride-1"
    _counted_nowhere(client, store, outcome_publisher, "ride-1")
    accepted = client.post(url, json={"duration_minutes": 14.0, "outcome_token": token})
    assert accepted.status_code == 200 and accepted.get_json()["outcome"] == "recorded"
    assert [sent["ride_id"] for sent, _ in outcome_publisher.sent] == ["ride-1"]


def test_an_outcome_before_the_ride_can_have_ended_is_refused_saying_when_it_may_come(outcomes):
    client, outcome_publisher, store, clock = outcomes
    asked_at = clock.now
    token = _booked(client, store)
    clock.now = asked_at + 59.5  # half a second before the contract's shortest ride can have ended
    early = client.post("/rides/ride-1/outcome", json={"duration_minutes": 14.0, "outcome_token": token})
    assert early.status_code == 425, early.get_json()
    body = early.get_json()
    assert body["not_before"] == asked_at + 60 and body["retry_after_seconds"] == 1 and early.headers["Retry-After"] == "1"
    assert "too early" in body["error"] and "in 1 s" in body["error"]
    _counted_nowhere(client, store, outcome_publisher, "ride-1")
    clock.now = asked_at + 60
    on_time = client.post("/rides/ride-1/outcome", json={"duration_minutes": 14.0, "outcome_token": token})
    assert on_time.status_code == 200 and on_time.get_json()["outcome"] == "recorded"


def test_the_earliest_outcome_is_a_setting_and_a_bad_one_is_refused_by_name(monkeypatch):
    monkeypatch.delenv("OUTCOME_EARLIEST_SECONDS", raising=False)
    assert BackendSettings.from_env().outcome_earliest_seconds == 60  # the contract's shortest ride
    monkeypatch.setenv("OUTCOME_EARLIEST_SECONDS", "0.5")
    assert BackendSettings.from_env().outcome_earliest_seconds == 0.5
    for bad in ("-1", "soon", "inf"):
        monkeypatch.setenv("OUTCOME_EARLIEST_SECONDS", bad)
        with pytest.raises(ValueError, match="OUTCOME_EARLIEST_SECONDS"):
            BackendSettings.from_env()


def test_riders_never_see_the_shadows_answer_and_only_the_post_hands_out_the_token(outcomes):
    client, _, store, clock = outcomes
    token = _booked(client, store)
    assert "3" in store.get("ride-1")["shadow"] and store.get("ride-1")["outcome_token"] == token  # kept for live quality
    answers = {
        "GET": client.get("/rides/ride-1"),
        "GET with wait": client.get("/rides/ride-1?wait=1"),
        "POST again (a retry)": client.post("/predict", json={**RIDE, "ride_id": "ride-1"}),
    }
    clock.now += 600
    answers["the outcome's"] = client.post("/rides/ride-1/outcome", json={"duration_minutes": 12.0, "outcome_token": token})
    for case, response in answers.items():
        body = response.get_json()
        assert response.status_code == 200 and body["duration_final"] == 14.0, (case, body)
        assert "shadow" not in body and "11.0" not in json.dumps(body), (case, body)  # nothing of the shadow's answer
        assert ("outcome_token" in body) == case.startswith("POST"), (case, body)
    # A client that lost the POST's answer asks the same ride again and gets the same token.
    assert answers["POST again (a retry)"].get_json()["outcome_token"] == token
    # Another ride under the id (the ride as asked is not shown, so a ride_id alone cannot get the token).
    assert "ride" not in answers["GET"].get_json() and "fingerprint" not in answers["GET"].get_json()
    assert client.post("/predict", json={**RIDE, "ride_id": "ride-1", "trip_distance": 3}).status_code == 409


def test_an_outcome_sent_again_is_counted_once(outcomes):
    client, outcome_publisher, store, clock = outcomes
    token = _booked(client, store)
    clock.now += 600
    for _ in range(3):
        response = client.post("/rides/ride-1/outcome", json={"duration_minutes": 12.0, "outcome_token": token})
        assert response.status_code == 200
    assert response.get_json()["outcome"] == "same" and len(outcome_publisher.sent) == 1
    assert client.get("/readyz").get_json()["live_quality"]["models"]["final v2"]["rides"] == 1
