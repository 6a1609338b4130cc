"""The rider API's limits (backend/limits.py), counted in the machine's Redis as every replica counts them.

Two replicas of the app share one Redis (a key prefix of the test's own) for their limits; each refusal is a
429 with Retry-After and records nothing, so the same request later is taken once.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import redis
from conftest import REDIS_URL, REPO, IdleListener
from dockerfile_parse import DockerfileParser
from limits import parse
from test_backend import RecordingPublisher, settings

from backend.app import create_app
from backend.results import InMemoryResultStore
from backend.settings import BackendSettings

RIDE = {"datetime": "2022-06-23 11:36:42", "PULocationID": 34, "DOLocationID": 56, "trip_distance": 12}


def replicas(redis_prefix: str, store=None, count: int = 2, **overrides):
    """``count`` replicas (test clients) sharing ``store`` and, for their limits, the machine's Redis."""
    store = store or InMemoryResultStore()
    publisher = RecordingPublisher()
    config = settings(**{"redis_url": REDIS_URL, "redis_prefix": redis_prefix, **overrides})
    apps = [
        create_app(config, publisher=publisher, store=store, listener=IdleListener(), outcome_publisher=RecordingPublisher())
        for _ in range(count)
    ]
    return [app.test_client() for app in apps], publisher, store


def rider(address: str) -> dict:
    """Cloud Run's front end appends the client's address to X-Forwarded-For."""
    return {"X-Forwarded-For": address}


def refused(response) -> int:
    """The 429's Retry-After, checked against its body."""
    assert response.status_code == 429, response.get_json()
    body = response.get_json()
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1 and body["retry_after_seconds"] == retry_after and "too many requests" in body["error"]
    return retry_after


def test_a_clients_rides_are_counted_across_replicas_and_a_refused_ride_is_taken_once_later(redis_prefix):
    (first, second), publisher, store = replicas(redis_prefix, rides_per_client="3 per 2 seconds")
    for client, ride_id in ((first, "a-1"), (second, "a-2"), (first, "a-3")):
        assert client.post("/predict", json={**RIDE, "ride_id": ride_id}, headers=rider("198.51.100.7")).status_code == 202
    turned_away = second.post("/predict", json={**RIDE, "ride_id": "a-4"}, headers=rider("198.51.100.7"))
    retry_after = refused(turned_away)
    assert "rides per client" in turned_away.get_json()["error"] and retry_after <= 2
    assert store.get("a-4") is None and "a-4" not in [attrs["ride_id"] for _, attrs in publisher.sent]  # nothing kept
    # Another client is not held back by the first one's rides.
    assert first.post("/predict", json={**RIDE, "ride_id": "b-1"}, headers=rider("198.51.100.8")).status_code == 202

    time.sleep(retry_after)  # as asked: the same ride again is taken, once
    again = first.post("/predict", json={**RIDE, "ride_id": "a-4"}, headers=rider("198.51.100.7"))
    assert again.status_code == 202 and again.get_json()["ride_id"] == "a-4"
    assert [attrs["ride_id"] for _, attrs in publisher.sent].count("a-4") == 1


def test_the_client_is_the_address_the_front_end_saw_not_what_it_wrote_itself(redis_prefix):
    """A client that writes its own X-Forwarded-For entries is still counted by the address Cloud Run appended
    (TRUSTED_PROXY_HOPS from the right); behind a load balancer (two hops) by the one before the balancer's."""
    (client,), _, _ = replicas(redis_prefix, count=1, rides_per_client="2/minute")
    for forged in ("10.0.0.1", "10.0.0.2"):
        assert client.post("/predict", json=RIDE, headers=rider(f"{forged}, 198.51.100.9")).status_code == 202
    refused(client.post("/predict", json=RIDE, headers=rider("10.0.0.3, 198.51.100.9")))

    (behind_balancer,), _, _ = replicas(f"{redis_prefix}:lb", count=1, rides_per_client="2/minute", trusted_proxy_hops=2)
    for _ in range(2):
        assert behind_balancer.post("/predict", json=RIDE, headers=rider("198.51.100.9, 35.191.0.1")).status_code == 202
    refused(behind_balancer.post("/predict", json=RIDE, headers=rider("198.51.100.9, 35.191.0.2")))
    assert behind_balancer.post("/predict", json=RIDE, headers=rider("198.51.100.10, 35.191.0.1")).status_code == 202


def test_everyones_rides_together_are_bounded(redis_prefix):
    (first, second), _, store = replicas(redis_prefix, rides_overall="4/minute")
    for index in range(4):
        client = (first, second)[index % 2]
        assert (
            client.post("/predict", json={**RIDE, "ride_id": f"o-{index}"}, headers=rider(f"203.0.113.{index}")).status_code
            == 202
        )
    flood = second.post("/predict", json={**RIDE, "ride_id": "o-4"}, headers=rider("203.0.113.99"))
    refused(flood)
    assert "rides for everyone" in flood.get_json()["error"] and store.get("o-4") is None


def test_polls_per_client_bound_the_long_polls_it_holds(redis_prefix):
    (first, second), _, _ = replicas(redis_prefix, polls_per_client="2 per 10 seconds")
    ride_id = first.post("/predict", json=RIDE, headers=rider("198.51.100.20")).get_json()["ride_id"]
    assert first.get(f"/rides/{ride_id}", headers=rider("198.51.100.20")).status_code == 200
    assert second.get(f"/rides/{ride_id}", headers=rider("198.51.100.20")).status_code == 200
    turned_away = first.get(f"/rides/{ride_id}", headers=rider("198.51.100.20"))
    assert refused(turned_away) <= 10 and "polls per client" in turned_away.get_json()["error"]
    assert second.get(f"/rides/{ride_id}", headers=rider("198.51.100.21")).status_code == 200  # another rider


def test_an_instance_with_every_long_poll_taken_refuses_another_at_once_and_never_a_recorded_ride(redis_prefix):
    (first, second), _, store = replicas(redis_prefix, long_polls_per_instance=1)
    ride_id = first.post("/predict", json=RIDE, headers=rider("198.51.100.30")).get_json()["ride_id"]
    waiting = threading.Thread(target=lambda: first.get(f"/rides/{ride_id}?wait=3", headers=rider("198.51.100.30")))
    waiting.start()
    try:
        deadline = time.monotonic() + 5
        slots = first.application.extensions["ridestream"]["limits"].poll_slots
        while slots.in_use == 0:  # until the first long poll waits on the ride
            assert time.monotonic() < deadline, "the long poll never waited"
            time.sleep(0.01)
        started = time.monotonic()
        turned_away = first.get(f"/rides/{ride_id}?wait=3", headers=rider("198.51.100.31"))
        assert refused(turned_away) == 1 and time.monotonic() - started < 1  # at once, not after waiting
        assert "long polls of this instance" in turned_away.get_json()["error"]
        assert second.get(f"/rides/{ride_id}?wait=0.2", headers=rider("198.51.100.31")).status_code == 200  # another instance
        # A new ride asking to wait is recorded and answered at once (202), never refused.
        booked = first.post("/predict?wait=3", json={**RIDE, "ride_id": "no-slot"}, headers=rider("198.51.100.32"))
        assert booked.status_code == 202 and store.get("no-slot")["status"] == "pending"
    finally:
        waiting.join(10)


def test_outcomes_are_bounded_per_ride(redis_prefix):
    (first, second), _, store = replicas(redis_prefix, outcomes_per_ride="2/hour", outcome_earliest_seconds=0)
    asked = first.post("/predict", json=RIDE, headers=rider("198.51.100.40")).get_json()
    other = first.post("/predict", json={**RIDE, "trip_distance": 3}, headers=rider("198.51.100.40")).get_json()
    url = f"/rides/{asked['ride_id']}/outcome"
    for client in (first, second):  # wrong tokens: refused (403), and counted
        assert client.post(url, json={"duration_minutes": 9, "outcome_token": "guess"}).status_code == 403
    turned_away = first.post(url, json={"duration_minutes": 9, "outcome_token": asked["outcome_token"]})
    refused(turned_away)
    assert "outcomes per ride" in turned_away.get_json()["error"] and "actual_minutes" not in store.get(asked["ride_id"])
    other_url = f"/rides/{other['ride_id']}/outcome"  # another ride is not held back
    assert second.post(other_url, json={"duration_minutes": 9, "outcome_token": other["outcome_token"]}).status_code != 429


def test_a_clients_refused_rides_never_use_up_everyones_whichever_limit_is_looked_at_first(redis_prefix):
    """Flask-Limiter looks at a route's limits in the order of their units: with everyone's per second and a
    client's per minute, everyone's comes first. It counts the rides taken only, so one client hammering past
    its own limit leaves everyone's untouched."""
    (client,), _, _ = replicas(redis_prefix, count=1, rides_per_client="3/minute", rides_overall="5/second")
    answers = [client.post("/predict", json=RIDE, headers=rider("198.51.100.70")).status_code for _ in range(20)]
    assert answers.count(202) == 3 and answers.count(429) == 17
    others = [client.post("/predict", json=RIDE, headers=rider(f"198.51.100.{80 + i}")).status_code for i in range(2)]
    assert others == [202, 202], others  # everyone's second still has room: the 17 refused did not count


def test_outcomes_for_made_up_rides_leave_nothing_in_redis_and_a_client_is_bounded(redis_prefix):
    (client,), _, _ = replicas(redis_prefix, count=1, outcomes_per_client="5/minute", outcome_earliest_seconds=0)
    shared = redis.Redis.from_url(REDIS_URL)
    for made_up in ("no-such-ride", "x" * 500, "bad id with spaces"):
        assert client.post(
            f"/rides/{made_up}/outcome", json={"duration_minutes": 9}, headers=rider("198.51.100.90")
        ).status_code in (
            400,
            404,
        )
    assert not [key for key in shared.scan_iter(f"*{redis_prefix}:limits*") if b"outcomes-per-ride" in key]
    for _ in range(2):
        client.post("/rides/another-made-up-ride/outcome", json={"duration_minutes": 9}, headers=rider("198.51.100.90"))
    refused(client.post("/rides/one-more/outcome", json={"duration_minutes": 9}, headers=rider("198.51.100.90")))


def test_an_ipv6_client_counts_by_its_64_prefix(redis_prefix):
    (client,), _, _ = replicas(redis_prefix, count=1, rides_per_client="2/minute")
    for host in ("1", "2"):
        assert client.post("/predict", json=RIDE, headers=rider(f"2001:db8:0:1::{host}")).status_code == 202
    refused(client.post("/predict", json=RIDE, headers=rider("2001:db8:0:1:ffff::3")))  # the same /64
    assert client.post("/predict", json=RIDE, headers=rider("2001:db8:0:2::1")).status_code == 202  # another one


def test_a_client_far_over_its_limit_keeps_the_limits_memory_bounded(redis_prefix):
    """Moving windows keep at most the limit's count of entries per client, whatever the client sends."""
    (client,), _, _ = replicas(redis_prefix, count=1, rides_per_client="5/minute")
    answers = [client.post("/predict", json=RIDE, headers=rider("198.51.100.50")).status_code for _ in range(250)]
    assert answers.count(202) == 5 and answers.count(429) == 245
    shared = redis.Redis.from_url(REDIS_URL)
    keys = list(shared.scan_iter(f"*{redis_prefix}:limits*"))
    entries = sum(shared.llen(key) for key in keys if shared.type(key) == b"list")
    assert 0 < len(keys) <= 4 and entries <= 5 + 5, (keys, entries)  # this client's window and everyone's


def test_with_the_limits_store_down_a_ride_is_still_taken():
    """Redis unreachable: the limits let the request through (its own store answers for it), never a 500."""
    (client,), _, store = replicas("unused", count=1, redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.2)
    response = client.post("/predict", json={**RIDE, "ride_id": "through"}, headers=rider("198.51.100.60"))
    assert response.status_code == 202 and store.get("through")["status"] == "pending"


@pytest.mark.parametrize(
    "name, value",
    [("LIMIT_RIDES_PER_CLIENT", "lots"), ("LIMIT_POLLS_PER_CLIENT", "20 per fortnight"), ("LIMIT_LONG_POLLS_PER_INSTANCE", "0")],
)
def test_a_limit_that_does_not_parse_stops_the_backend_at_start_with_its_name(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        BackendSettings.from_env()


def test_the_defaults_hold_what_the_deployment_is_sized_for(monkeypatch):
    """Everyone's rides: above the rate the defaults are sized for, below the one at which records fill the default
    Memorystore to its alert. Long polls: fewer than an instance's threads, so a POST always finds one."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import capacity

    for name in ("LIMIT_RIDES_OVERALL", "LIMIT_LONG_POLLS_PER_INSTANCE"):
        monkeypatch.delenv(name, raising=False)
    defaults = BackendSettings.from_env()
    overall = parse(defaults.rides_overall)
    per_second = overall.amount / overall.get_expiry()
    deployment = capacity.Deployment()
    assert (
        capacity.DEFAULT_MAX_RIDES_PER_SECOND < per_second <= capacity.memory_alert_rate(capacity.MEASURED_PER_RIDE, deployment)
    )
    image = DockerfileParser(path=str(REPO / "backend/Dockerfile"))
    args = image.envs["GUNICORN_CMD_ARGS"].split()
    threads = int(args[args.index("--threads") + 1])
    assert 0 < defaults.long_polls_per_instance < threads
