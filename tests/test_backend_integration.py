"""The backend against real services: the Pub/Sub emulator, Redis shared by two replicas, and gunicorn
started with the Dockerfile's own command."""

from __future__ import annotations

import json
import shlex
import socket
import threading
import time

import pytest
import requests
from conftest import REDIS_URL, REPO, unique
from dockerfile_parse import DockerfileParser
from google.cloud import pubsub_v1

from backend.app import create_app
from backend.results import RedisResultStore
from backend.settings import BackendSettings
from devstack.processes import Service, answers_http, free_port
from devstack.pubsub import ensure_subscription, ensure_topic, pull_messages
from ride_contract.quality import bucket_of
from ride_contract.ride import Ride

pytestmark = pytest.mark.integration

RIDE = {"datetime": "2021-03-04 18:59:00", "PULocationID": 196, "DOLocationID": 28, "trip_distance": 2.5}


def test_redis_store_is_shared_between_replicas(redis_prefix):
    replica_a = RedisResultStore(REDIS_URL, ttl_seconds=60, prefix=redis_prefix)
    replica_b = RedisResultStore(REDIS_URL, ttl_seconds=60, prefix=redis_prefix)
    record = {"ride_id": "r1", "status": "pending", "duration_coarse": 9.0, "fingerprint": "f1"}
    assert replica_a.create("r1", record, resend_at=100) is None
    existing = replica_b.create("r1", {"ride_id": "r1", "status": "pending"}, resend_at=100)  # one ride_id, one ride
    assert existing == record and replica_b.publishes("r1") == 0  # recorded before it is published (the outbox)

    # Either replica may resend a ride the other accepted, but never both within the lease; a claim is
    # not a publish: only a publish the broker confirmed counts.
    assert replica_b.claim_due(now=100, lease_seconds=30) == [("r1", 0)]
    assert replica_a.claim_due(now=110, lease_seconds=30) == []
    replica_a.published("r1", resend_at=131)
    assert replica_a.claim_due(now=131, lease_seconds=30) == [("r1", 1)]
    replica_b.reschedule("r1", at=140)  # its publish failed: due again soon
    assert replica_a.claim_due(now=139, lease_seconds=30) == [] and replica_a.claim_due(140, 30) == [("r1", 1)]

    waited: list = []
    waiter = threading.Thread(target=lambda: waited.append(replica_a.wait("r1", timeout=5)))
    waiter.start()
    threading.Event().wait(0.2)
    result = {"ride_id": "r1", "duration_final": 12.5, "model_run_id": "abc", "ride_fingerprint": "f1"}
    assert replica_b.complete("r1", {**result, "ride_fingerprint": ""}) == "mismatch"  # fails closed
    replica_b.complete("r1", result)
    waiter.join()
    assert waited[0] == {**record, "status": "done", "duration_final": 12.5, "model_run_id": "abc"}
    assert replica_a.wait("r2", timeout=0.2) is None
    assert replica_a.claim_due(now=1e12, lease_seconds=30) == []  # answered: no longer due a resend
    assert replica_b.complete("r2", {**result, "ride_id": "r2"}) == "unknown"
    assert replica_a.get("r2") is None  # a result for no ride is not made into one


def _ride_life(store: RedisResultStore, ride_id: str) -> None:
    """A ride from its POST to its published outcome, as the backend's paths drive the store."""
    record = {
        "ride_id": ride_id,
        "status": "pending",
        "fingerprint": "f",
        "requested_at": 1.0,
        "ride": RIDE,
        "duration_coarse": 9.0,
    }
    store.create(ride_id, record, resend_at=100)
    answer = {"ride_id": ride_id, "duration_final": 12.5, "model_run_id": "run-2", "model_version": "2", "ride_fingerprint": "f"}
    assert store.complete(ride_id, answer) == "stored"
    assert store.complete(ride_id, answer) == "settled"  # a redelivery changes nothing
    assert store.add_shadow(ride_id, {**answer, "duration_final": 11.0, "model_version": "3"}) == "stored"
    assert store.record_outcome(ride_id, 14.0, now=1000.0)[0] == "recorded"
    store.outcome_published(ride_id)


@pytest.mark.parametrize("scripted", [True, False], ids=["script", "transaction"])
def test_each_update_of_a_ride_is_whole_whichever_way_redis_applies_it(redis_prefix, scripted):
    import redis

    store = RedisResultStore(REDIS_URL, ttl_seconds=60, prefix=redis_prefix, scripted_updates=scripted)
    client = redis.Redis.from_url(REDIS_URL)
    with client.pubsub() as channel:
        channel.subscribe(f"{redis_prefix}:done:r1")
        _ride_life(store, "r1")
        published = [m["data"] for m in iter(lambda: channel.get_message(timeout=0.5), None) if m["type"] == "message"]
    record = store.get("r1")
    assert record["status"] == "done" and record["duration_final"] == 12.5 and record["outcome_published"] is True
    assert record["shadow"] == {"3": {"duration_final": 11.0, "model_run_id": "run-2", "clipped": False}}
    assert 0 < client.ttl(f"{redis_prefix}:ride:r1") <= 60  # the update kept the record's TTL
    # What goes with the final: off the resend schedule, into the stream's figures, waiters woken once.
    assert store.claim_due(now=1e12, lease_seconds=30) == [] and store.publishes("r1") == 0
    assert store.stats(time.time())["finals_in_window"] == 1 and published == [b"done"]
    # The outcome's sums, once: the coarse estimate 9.0, final v2 12.5 and the shadow v3 11.0, for 14.0.
    bucket = f"{redis_prefix}:quality:{bucket_of(1000.0)}"
    sums = {k.decode(): float(v) for k, v in client.hgetall(bucket).items()}
    assert sums["final v2|n"] == 1 and sums["final v2|err"] == pytest.approx(-1.5) and sums["final v2|sq"] == pytest.approx(2.25)
    assert sums["shadow v3|err"] == pytest.approx(-3.0) and sums["coarse|abs"] == pytest.approx(5.0)
    assert 0 < client.ttl(bucket) <= 60


@pytest.mark.parametrize("scripted", [True, False], ids=["script", "transaction"])
def test_an_update_racing_another_keeps_both(redis_prefix, scripted, monkeypatch):
    """The shadow's answer is being added when the final lands: the shadow's update, having read the
    record before the final, must be made again on the record with the final, not over it."""
    import backend.results as results

    store = RedisResultStore(REDIS_URL, ttl_seconds=60, prefix=redis_prefix, scripted_updates=scripted)
    other_replica = RedisResultStore(REDIS_URL, ttl_seconds=60, prefix=redis_prefix, scripted_updates=scripted)
    store.create("r1", {"ride_id": "r1", "status": "pending", "fingerprint": "f"}, resend_at=100)
    answer = {"ride_id": "r1", "duration_final": 12.5, "model_run_id": "run-2", "model_version": "2", "ride_fingerprint": "f"}
    with_shadow, attempts = results._with_shadow, []

    def racing(record, result):
        attempts.append(record["status"])
        if len(attempts) == 1:
            assert other_replica.complete("r1", answer) == "stored"  # lands after this update read the record
        return with_shadow(record, result)

    monkeypatch.setattr(results, "_with_shadow", racing)
    assert store.add_shadow("r1", {**answer, "duration_final": 11.0, "model_version": "3"}) == "stored"
    assert attempts == ["pending", "done"]  # tried again on the record as the final left it
    record = store.get("r1")
    assert record["status"] == "done" and record["duration_final"] == 12.5 and "3" in record["shadow"]


def test_long_polls_reuse_their_redis_connection_and_still_wake_on_the_answer(tmp_path):
    """A wait subscribes on a connection of its own; finished, it leaves it for the next wait instead of
    closing it (a connection and a HELLO per ride cost Redis about a tenth of its CPU per ride). On a
    Redis of the test's own, so the connections counted are the store's alone."""
    import redis

    from devstack.processes import redis_server

    server = redis_server(tmp_path / "logs", tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)

        def connections() -> int:
            return client.info("stats")["total_connections_received"]

        for reuse, opened in ((False, 5), (True, 1)):
            store = RedisResultStore(server.url, ttl_seconds=60, prefix=f"reuse-{reuse}", reuse_wait_connections=reuse)
            store.create("r1", {"ride_id": "r1", "status": "pending", "fingerprint": "f1"}, resend_at=100)
            before = connections()
            for _ in range(5):
                assert store.wait("r1", timeout=0.05)["status"] == "pending"
            # The store's command connection was opened before; each wait's own, or the one kept.
            assert connections() - before == opened, reuse
            # A completion still wakes a wait on a reused connection, at once.
            timer = threading.Timer(
                0.2, store.complete, ("r1", {"ride_id": "r1", "duration_final": 9.5, "ride_fingerprint": "f1"})
            )
            timer.start()
            began = time.monotonic()
            waited = store.wait("r1", timeout=5)
            timer.join()
            assert waited["status"] == "done" and time.monotonic() - began < 2
        # Redis restarted: the kept connection is stale, and the wait says nothing of it (no 503).
        server.stop()
        server = redis_server(tmp_path / "logs", tmp_path / "redis", port=server.port).start()
        assert store.wait("r1", timeout=0.05)["status"] == "done"  # AOF: the answer survived the restart
    finally:
        server.stop()


def test_redis_store_reopens_failed_rides_and_forgets_vanished_ones(redis_prefix):
    import redis

    store = RedisResultStore(REDIS_URL, ttl_seconds=60, prefix=redis_prefix)
    record = {"ride_id": "r1", "status": "pending", "fingerprint": "f1"}
    store.create("r1", record, resend_at=100)
    store.published("r1", resend_at=100)
    assert store.reopen("r1", record, resend_at=100) is False  # only a failed ride is tried afresh
    store.complete("r1", {"ride_id": "r1", "error": "no final"}, status="failed")
    assert store.stats(0)["pending_rides"] == 0
    assert store.reopen("r1", record, resend_at=100) is True
    assert store.get("r1") == record and store.publishes("r1") == 0 and store.claim_due(100, 30) == [("r1", 0)]

    redis.Redis.from_url(REDIS_URL).delete(f"{redis_prefix}:ride:r1")  # expired, or evicted
    store.forget_pending("r1")
    assert store.stats(0)["pending_rides"] == 0 and store.claim_due(1e12, 30) == []


def test_redis_store_down_is_store_unavailable_not_a_crash():
    from backend.results import StoreUnavailable

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead_url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    store = RedisResultStore(dead_url, ttl_seconds=60, prefix="nobody")
    for call in (lambda: store.create("r", {}, 0), lambda: store.get("r"), lambda: store.claim_due(0, 1), store.ping):
        with pytest.raises(StoreUnavailable, match="Redis unavailable"):
            call()


class StandInConsumer:
    """Plays the serving function: pulls rides from the push topic, answers 2 minutes per mile."""

    def __init__(self, project: str, push_subscription: str, pull_topic: str):
        self.project, self.subscription, self.pull_topic = project, push_subscription, pull_topic
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        publisher = pubsub_v1.PublisherClient()
        topic = publisher.topic_path(self.project, self.pull_topic)
        while not self.stop.is_set():
            for message in pull_messages(self.project, self.subscription, 100, timeout=1):
                ride = json.loads(message.data)
                result = {
                    "ride_id": ride["ride_id"],
                    "duration_final": ride["trip_distance"] * 2,
                    "model_run_id": "stand-in",
                    "ride_fingerprint": Ride.model_validate(ride).fingerprint(),
                }
                publisher.publish(topic, json.dumps(result).encode()).result(timeout=10)


@pytest.fixture
def streams(emulators):
    names = {"push": unique("push"), "pull": unique("pull")}
    for topic in names.values():
        ensure_topic(emulators.project, topic)
    ensure_subscription(emulators.project, names["push"], names["push"] + "-sub")
    ensure_subscription(emulators.project, names["pull"], names["pull"] + "-sub")
    consumer = StandInConsumer(emulators.project, names["push"] + "-sub", names["pull"])
    consumer.thread.start()
    yield names
    consumer.stop.set()
    consumer.thread.join(timeout=10)


def backend_settings(emulators, streams, **overrides) -> BackendSettings:
    base = BackendSettings.from_env()
    values = {
        **base.__dict__,
        "project_id": emulators.project,
        "push_topic": streams["push"],
        "pull_subscription": streams["pull"] + "-sub",
        **overrides,
    }
    return BackendSettings(**values)


def test_round_trip_through_the_emulator(emulators, streams):
    app = create_app(backend_settings(emulators, streams))
    client = app.test_client()
    try:
        response = client.post("/predict?wait=10", json=RIDE)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        assert body["duration_final"] == 5.0 and body["model_run_id"] == "stand-in"
        assert client.get(f"/rides/{body['ride_id']}").get_json()["status"] == "done"
        ready = client.get("/readyz").get_json()
        assert ready["ready"] is True and ready["results_received"] == 1
    finally:
        app.extensions["ridestream"]["listener"].stop()


def test_two_replicas_sharing_redis_and_one_subscription_serve_any_ride(emulators, streams, redis_prefix):
    replicas = []
    for _ in range(2):
        store = RedisResultStore(REDIS_URL, ttl_seconds=60, prefix=redis_prefix)
        replicas.append(create_app(backend_settings(emulators, streams), store=store))
    clients = [app.test_client() for app in replicas]
    try:
        rides = [{**RIDE, "trip_distance": float(d)} for d in range(1, 21)]
        ride_ids = [clients[i % 2].post("/predict", json=ride).get_json()["ride_id"] for i, ride in enumerate(rides)]
        for i, (ride, ride_id) in enumerate(zip(rides, ride_ids, strict=True)):
            other = clients[(i + 1) % 2]  # ask the replica that did not take the ride, as a rider long-polls
            for _ in range(3):
                body = other.get(f"/rides/{ride_id}?wait=5").get_json()
                if body["status"] == "done":
                    break
            assert body["duration_final"] == ride["trip_distance"] * 2, body
    finally:
        for app in replicas:
            app.extensions["ridestream"]["listener"].stop()


def _dockerfile() -> DockerfileParser:
    # Given the file's path it only reads; setting .content would write a Dockerfile into the cwd.
    return DockerfileParser(str(REPO / "backend/Dockerfile"))


def test_dockerfile_is_slim_non_root_gunicorn_and_has_no_credentials():
    parser = _dockerfile()
    assert parser.baseimage.endswith("-slim")
    users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "gunicorn" in parser.cmd and "backend.app:create_app()" in parser.cmd
    text = parser.content.lower()
    for secret_hint in ("google_application_credentials", "service-account", ".json", "password", "secret", "key="):
        assert secret_hint not in text, secret_hint
    copied = [i["value"] for i in parser.structure if i["instruction"] in ("COPY", "ADD")]
    assert all(src.split()[0].startswith(("backend/", "ride_contract/")) for src in copied), copied


def test_the_dockerfile_command_serves_the_app(emulators, streams, tmp_path):
    parser = _dockerfile()
    port = free_port()
    # The image's CMD, run here: same gunicorn invocation, bound to loopback instead of 0.0.0.0.
    command = json.loads(parser.cmd) if parser.cmd.startswith("[") else shlex.split(parser.cmd)
    assert command[:2] == ["sh", "-c"]
    shell = command[2].replace("0.0.0.0:${PORT}", f"127.0.0.1:{port}").replace("exec gunicorn", f"exec {REPO}/.venv/bin/gunicorn")
    env = {
        "PROJECT_ID": emulators.project,
        "BACKEND_PUSH_STREAM": streams["push"],
        "BACKEND_PULL_SUBSCRIPTION": streams["pull"] + "-sub",
        "WEB_CONCURRENCY": parser.envs["WEB_CONCURRENCY"],
        "GUNICORN_CMD_ARGS": parser.envs["GUNICORN_CMD_ARGS"],  # the image's serving model: its worker class and threads
    }
    server = Service(
        "backend-gunicorn",
        ["sh", "-c", shell],
        port,
        tmp_path,
        answers_http(f"http://127.0.0.1:{port}/healthz"),
        env=env,
        cwd=REPO,
    )
    with server:
        url = f"http://127.0.0.1:{port}"
        assert requests.get(url + "/readyz", timeout=10).json()["ready"] is True
        response = requests.post(url + "/predict?wait=10", json=RIDE, timeout=20)
        assert response.status_code == 200 and response.json()["duration_final"] == 5.0
        assert requests.post(url + "/predict", json={**RIDE, "PULocationID": 999}, timeout=10).status_code == 400
    logs = server.log_path.read_text()
    assert '"message": "ride accepted"' in logs  # structured JSON logs


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_the_stores_stream_figures_count_pending_rides_and_time_finals_from_their_post(kind, redis_prefix):
    import time

    from backend.results import InMemoryResultStore, RedisResultStore

    store = InMemoryResultStore() if kind == "memory" else RedisResultStore(REDIS_URL, 60, redis_prefix)
    now = time.time()
    for i, waited in enumerate((0.1, 0.2, 0.3, 2.0)):  # requested `waited` seconds ago
        record = {"ride_id": f"r{i}", "status": "pending", "fingerprint": "f", "requested_at": now - waited}
        assert store.create(f"r{i}", record, resend_at=now + 60) is None
    store.create("still-pending", {"ride_id": "p", "status": "pending", "requested_at": now}, resend_at=now + 60)
    for i in range(4):
        store.complete(f"r{i}", {"ride_id": f"r{i}", "duration_final": 10.0, "ride_fingerprint": "f"})
    figures = store.stats(time.time())
    assert figures["pending_rides"] == 1 and figures["finals_in_window"] == 4
    assert figures["finals_per_second"] == 0.4  # four finals over the last ten seconds
    assert 200 <= figures["latency_ms_p50"] < 1000 and 2000 <= figures["latency_ms_p95"] < 3000
