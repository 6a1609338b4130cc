"""The rollout service: signed webhooks only, the production alias of our model only, serialized and idempotent
rollouts that end on the latest version, failures that leave the old model serving, and the mismatch report."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from rollout.app import create_app
from rollout.reconcile import Deployment, Rollout
from rollout.settings import RolloutSettings
from rollout.webhook import DELIVERY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, Rejected, WebhookVerifier, sign

SECRET = "test-secret-not-used-anywhere-else"
OPERATOR = "operator-token-of-this-test"
SETTINGS = RolloutSettings(
    SECRET, "ride-duration", {"production": "function"}, 300, 0.05, 0.2, operator_token=OPERATOR, status_cache_seconds=0
)
AS_OPERATOR = {"Authorization": f"Bearer {OPERATOR}"}
V1, V2, V3 = (Deployment(str(v), f"run-{v}", f"gs://models/m-{v}") for v in (1, 2, 3))


def event(alias: str = "production", version: str = "2", name: str = "ride-duration", action: str = "created") -> bytes:
    data = {"name": name, "alias": alias, "version": version}
    return json.dumps(
        {"entity": "model_version_alias", "action": action, "timestamp": "2026-12-01T00:00:00Z", "data": data}
    ).encode()


def signed(body: bytes, secret: str = SECRET, delivery: str | None = None, timestamp: int | None = None) -> dict:
    delivery = delivery or str(uuid.uuid4())
    stamp = str(timestamp if timestamp is not None else int(time.time()))
    return {
        DELIVERY_ID_HEADER: delivery,
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign(secret, delivery, stamp, body),
        "Content-Type": "application/json",
    }


class Registry:
    """Aliases -> deployments, moved by the test as an operator would in the UI."""

    def __init__(self, **aliases: Deployment):
        self.aliases = dict(aliases)

    def resolve(self, alias: str) -> Deployment | None:
        return self.aliases.get(alias)


class FakeTarget:
    """Serves one deployment; deploying takes a while and can be made to fail."""

    name = "fake function"

    def __init__(self, serving: Deployment | None = None, deploy_seconds: float = 0.0):
        self.current = serving
        self.deployed: list[str] = []
        self.failures_left = 0
        self.deploy_seconds = deploy_seconds

    def serving(self) -> Deployment | None:
        return self.current

    def deploy(self, model: Deployment) -> None:
        time.sleep(self.deploy_seconds)
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError(f"v{model.version} did not start: cannot load its model")
        self.deployed.append(model.version)
        self.current = model


class RecordingRollout:
    def __init__(self):
        self.requests: list[str] = []

    def request(self, reason: str) -> None:
        self.requests.append(reason)

    def status(self) -> dict:
        return {"in_sync": True}


@pytest.fixture
def webhook_app():
    rollout = RecordingRollout()
    app = create_app(SETTINGS, rollouts={"production": rollout}, verifier=WebhookVerifier(SECRET))
    return app.test_client(), rollout


def test_a_signed_alias_event_starts_a_rollout(webhook_app):
    client, rollout = webhook_app
    body = event()
    response = client.post("/webhooks/mlflow", data=body, headers=signed(body))
    assert response.status_code == 202 and response.get_json()["alias"] == "production"
    assert len(rollout.requests) == 1 and "v2" in rollout.requests[0]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (lambda body: {"Content-Type": "application/json"}, "unsigned"),
        (lambda body: signed(body, secret="another-secret"), "does not match"),
        (lambda body: signed(event(version="3")), "does not match"),  # the signature of another body
        (lambda body: signed(body, timestamp=int(time.time()) - 3600), "tolerance"),
        (lambda body: {**signed(body), TIMESTAMP_HEADER: "yesterday"}, "Unix seconds"),
    ],
)
def test_unsigned_wrongly_signed_or_stale_calls_get_401_and_change_nothing(webhook_app, headers, reason):
    client, rollout = webhook_app
    body = event()
    response = client.post("/webhooks/mlflow", data=body, headers=headers(body))
    assert response.status_code == 401 and reason in response.get_json()["reason"]
    assert rollout.requests == []


def test_a_replayed_delivery_gets_401_even_within_the_tolerance(webhook_app):
    client, rollout = webhook_app
    body = event()
    headers = signed(body)
    assert client.post("/webhooks/mlflow", data=body, headers=headers).status_code == 202
    replay = client.post("/webhooks/mlflow", data=body, headers=headers)
    assert replay.status_code == 401 and "replay" in replay.get_json()["reason"]
    assert len(rollout.requests) == 1


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (event(name="another-model"), "is not 'ride-duration'"),
        (event(alias="staging"), "is not rolled out"),
        (
            json.dumps({"entity": "model_version", "action": "created", "data": {"name": "ride-duration"}}).encode(),
            "not an alias event",
        ),
    ],
)
def test_events_for_another_model_or_another_alias_are_ignored(webhook_app, body, why):
    client, rollout = webhook_app
    response = client.post("/webhooks/mlflow", data=body, headers=signed(body))
    assert response.status_code == 200 and why in response.get_json()["ignored"]
    assert rollout.requests == []


def test_the_verifier_needs_a_secret():
    with pytest.raises(ValueError, match="secret is required"):
        WebhookVerifier("")
    with pytest.raises(Rejected):
        WebhookVerifier(SECRET).verify({}, b"{}")


def test_two_promotions_in_quick_succession_end_on_the_last_one():
    registry, target = Registry(production=V1), FakeTarget(V1, deploy_seconds=0.3)
    rollout = Rollout("production", registry.resolve, target, 0.05, 0.2).start()
    try:
        assert rollout.wait_idle(10)
        registry.aliases["production"] = V2
        rollout.request("v2 promoted")
        time.sleep(0.1)  # v2 is being deployed when v3 is promoted
        registry.aliases["production"] = V3
        rollout.request("v3 promoted")
        assert rollout.wait_idle(10)
    finally:
        rollout.stop()
    assert target.current == V3 and target.deployed[-1] == "3"
    assert target.deployed in (["2", "3"], ["3"])  # never v3 then v2


def test_a_repeated_event_is_a_no_op():
    registry, target = Registry(production=V2), FakeTarget(V1)
    rollout = Rollout("production", registry.resolve, target, 0.05, 0.2).start()
    try:
        for _ in range(3):
            rollout.request("the same event, delivered again")
            assert rollout.wait_idle(10)
    finally:
        rollout.stop()
    assert target.deployed == ["2"]
    assert rollout.reconcile() == "already serving v2"


def test_a_failed_deploy_is_retried_within_its_budget_and_the_old_model_serves_meanwhile():
    registry, target = Registry(production=V2), FakeTarget(V1)
    target.failures_left = 2  # under the budget of 3
    rollout = Rollout("production", registry.resolve, target, retry_initial_seconds=0.3, retry_max_seconds=1).start()
    try:
        deadline = time.monotonic() + 5
        while rollout.failures == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        status = rollout.status()
        assert target.current == V1  # still serving the old model
        assert status["in_sync"] is False and status["state"] == "failing"
        assert "cannot load its model" in status["last_error"] and status["retry_in_seconds"] is not None
        assert rollout.wait_idle(10)  # retried until it worked
    finally:
        rollout.stop()
    assert target.current == V2 and rollout.status()["in_sync"] is True


def _story_registry(**aliases: Deployment):
    from rollout.reconcile import MemoryStory

    story, versions = MemoryStory(), {d.version: d for d in (V1, V2, V3)}
    story.aliases.update({alias: d.version for alias, d in aliases.items()})
    return story, lambda alias: versions.get(story.aliases.get(alias, ""))


@pytest.mark.parametrize("serving", [V1, None], ids=["v1-serving", "nothing-deployed-yet"])
def test_a_version_whose_deploy_always_fails_ends_blocked_and_is_not_deployed_again(serving):
    """Issue 33: retried forever, the registry saying production = v2 while v1 serves, one more failing revision a try.
    With nothing deployed yet there is no version to go back to: the first version, once blocked, stayed the
    alias's and every pass deployed it again (24 failing deploys in 3 minutes on the local stack)."""
    story, resolve = _story_registry(production=V2)
    target = FakeTarget(serving)
    target.failures_left = 10**6
    rollout = Rollout("production", resolve, target, 0.05, 0.1, story=story, deploy_attempts=3).start()
    try:
        assert rollout.wait_idle(10)
        for _ in range(5):  # passes after the block (webhooks, the resync) deploy nothing
            rollout.request("resync")
            assert rollout.wait_idle(10)
    finally:
        rollout.stop()
    assert target.current == serving and target.failures_left == 10**6 - 3  # three tries, then no more revisions
    assert story.aliases["production"] == ("1" if serving else "2")  # back on what serves, where something does
    assert story.tags["2"]["rollout_status"] == "blocked" and "3 deploys failed" in story.tags["2"]["rollout_reason"]
    # Each later pass: v1 serves what the alias names again, or, with nothing to go back to, v2 stays blocked.
    assert ("already serving v1" if serving else "is blocked") in rollout.history[-1]["message"], rollout.history[-1]


def test_a_revision_that_failed_readiness_blocks_at_once():
    from rollout.reconcile import RevisionNotReady

    story, resolve = _story_registry(production=V2)

    class NeverReady(FakeTarget):
        def deploy(self, model):
            self.deployed.append(model.version)
            raise RevisionNotReady(f"revision function-p-v{model.version} failed readiness: the container exited")

    target = NeverReady(V1)
    message = Rollout("production", resolve, target, story=story).reconcile()
    assert "blocked at deploy" in message and "failed readiness" in message, message
    assert target.deployed == ["2"] and target.current == V1 and story.aliases["production"] == "1"


def test_a_deleted_production_alias_leaves_the_function_serving():
    registry, target = Registry(), FakeTarget(V1)
    rollout = Rollout("production", registry.resolve, target)
    assert "no 'production' alias" in rollout.reconcile()
    assert target.current == V1 and target.deployed == []


def test_the_status_flags_a_registry_that_moved_without_the_function():
    registry, target = Registry(production=V2), FakeTarget(V1)
    rollout = Rollout("production", registry.resolve, target)  # not started: nobody rolls it out
    app = create_app(SETTINGS, rollouts={"production": rollout}, verifier=WebhookVerifier(SECRET))
    report = app.test_client().get("/status", headers=AS_OPERATOR).get_json()
    entry = report["aliases"]["production"]
    assert report["in_sync"] is False
    assert (entry["registry"]["version"], entry["serving"]["version"], entry["state"]) == ("2", "1", "out of sync")
    rollout.reconcile()
    assert app.test_client().get("/status").get_json()["in_sync"] is True


@pytest.mark.parametrize("path", ["/status", "/readyz"])
def test_public_status_answers_carry_no_internals_and_an_operator_gets_the_details(path):
    """Issue 33: the public /status and /readyz showed run ids, bucket paths and gcloud errors."""

    class Failing(FakeTarget):
        def serving(self):
            raise RuntimeError("gcloud run services describe failed: gs://secret-bucket/models run-2 permission denied")

    registry = Registry(production=V2)
    rollouts = {"production": Rollout("production", registry.resolve, FakeTarget(V1)), "challenger": None}
    rollouts["challenger"] = Rollout("challenger", registry.resolve, Failing())
    client = create_app(SETTINGS, rollouts=rollouts, verifier=WebhookVerifier(SECRET)).test_client()
    public = client.get(path)
    text = public.get_data(as_text=True)
    for internal in ("run-", "gs://", "gcloud", "permission"):
        assert internal not in text, text
    assert public.get_json()["aliases"]["production"]["serving_version"] == "1"
    for header in ({"Authorization": "Bearer not-the-token"}, {"Authorization": OPERATOR}):
        assert "gs://" not in client.get(path, headers=header).get_data(as_text=True)
    detailed = client.get(path, headers=AS_OPERATOR).get_data(as_text=True)
    assert "run-2" in detailed and "permission denied" in detailed


def test_status_answers_are_cached_so_calls_do_not_each_ask_the_registry_and_gcloud():
    from dataclasses import replace

    registry, asked = Registry(production=V2), []

    def resolve(alias):
        asked.append(alias)
        return registry.resolve(alias)

    rollout = Rollout("production", resolve, FakeTarget(V1))
    client = create_app(
        replace(SETTINGS, status_cache_seconds=60), rollouts={"production": rollout}, verifier=WebhookVerifier(SECRET)
    ).test_client()
    for _ in range(5):
        client.get("/status")
        client.get("/readyz")
    assert len(asked) == 1


def test_the_status_command_flags_riders_answered_by_another_model(monkeypatch):
    from rollout import __main__ as cli

    production = {"in_sync": True, "registry": {"version": "2", "run_id": "run-2"}, "serving": {"deployed_at": 1000.0}}
    answers = {
        "/status": {"in_sync": True, "aliases": {"production": production}},
        "/readyz": {"model_served": {"model_version": "1", "model_run_id": "run-1", "at": 1001.0}},
    }

    class Response:
        def __init__(self, url: str):
            self.url = url

        def json(self):  # a fresh body per call, as over HTTP
            return json.loads(json.dumps(answers["/" + self.url.rpartition("/")[2]]))

    monkeypatch.setenv("ROLLOUT_OPERATOR_TOKEN", "op")
    monkeypatch.setattr(cli.requests, "get", lambda url, timeout, headers=None: Response(url))
    report = cli.status("http://rollout", "http://backend")
    assert report["in_sync"] is False and "answered by v1" in report["mismatch"] and "production is v2" in report["mismatch"]
    answers["/readyz"]["model_served"]["at"] = 999.0  # answered before v2 was deployed: no ride since, no verdict
    assert cli.status("http://rollout", "http://backend")["in_sync"] is True
    answers["/readyz"]["model_served"] = {"model_version": "2", "model_run_id": "run-2", "at": 1002.0}
    assert cli.status("http://rollout", "http://backend")["in_sync"] is True


def test_rollouts_of_one_alias_never_overlap():
    registry = Registry(production=V1)
    inside, overlaps = threading.Semaphore(1), []

    class Watching(FakeTarget):
        def deploy(self, model):
            if not inside.acquire(blocking=False):
                overlaps.append(model.version)
                return
            try:
                super().deploy(model)
            finally:
                inside.release()

    target = Watching(None, deploy_seconds=0.05)
    rollout = Rollout("production", registry.resolve, target, 0.05, 0.2).start()
    try:
        for version in (V2, V3, V1, V2, V3):
            registry.aliases["production"] = version
            rollout.request("promotion")
            time.sleep(0.02)
        assert rollout.wait_idle(10)
    finally:
        rollout.stop()
    assert overlaps == [] and target.current == V3


def test_before_a_production_switch_the_version_really_serving_is_reported_for_the_previous_alias():
    registry, target, replaced = Registry(production=V2), FakeTarget(V1), []
    rollout = Rollout(
        "production", registry.resolve, target, before_switch=lambda serving, wanted: replaced.append((serving, wanted))
    )
    rollout.reconcile()
    rollout.reconcile()  # nothing moved: nothing to report
    assert replaced == [(V1, V2)]


def test_previous_is_the_serving_version_after_a_failed_rollout():
    """v2 serves, v3 is promoted and cannot start: a rollback must go to v2, not to the v1 before it."""
    registry, target, previous = Registry(production=V3), FakeTarget(V2), {"alias": "1"}
    target.failures_left = 1
    rollout = Rollout(
        "production", registry.resolve, target, before_switch=lambda serving, wanted: previous.update(alias=serving.version)
    )
    with pytest.raises(RuntimeError, match="did not start"):
        rollout.reconcile()
    assert target.current == V2 and previous["alias"] == "2"


def test_a_missed_webhook_is_corrected_by_the_resync():
    """MLflow delivers each webhook fire-and-forget; a lost one must not leave the old model serving."""
    registry, target = Registry(production=V1), FakeTarget(None)
    rollout = Rollout("production", registry.resolve, target, 0.05, 0.2, resync_seconds=0.3).start()
    try:
        assert rollout.wait_idle(5) and target.current == V1
        registry.aliases["production"] = V2  # moved, and its webhook never arrives: no request()
        deadline = time.monotonic() + 5
        while target.current != V2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert target.current == V2 and rollout.status()["resync_seconds"] == 0.3
    finally:
        rollout.stop()


def test_a_replay_from_a_sender_whose_clock_runs_ahead_is_refused_after_the_window():
    """The seen ids are kept by the signed timestamp: a call stamped 250 s ahead, replayed 301 s later,
    is still a replay (keyed on arrival time it was forgotten at 300 s and accepted again)."""
    now = [1_000_000.0]
    verifier = WebhookVerifier(SECRET, tolerance_seconds=300, clock=lambda: now[0])
    body = event()
    headers = signed(body, delivery="skewed", timestamp=int(now[0]) + 250)
    assert verifier.verify(headers, body) == "skewed"
    now[0] += 301
    with pytest.raises(Rejected, match="replay"):
        verifier.verify(headers, body)
    now[0] += 300  # now the signed timestamp itself is too old
    with pytest.raises(Rejected, match="timestamp"):
        verifier.verify(headers, body)


def test_two_controllers_overlapping_never_both_act(redis_prefix):
    """Issue 33: Cloud Run overlaps two controller instances at every deploy of it. Two real Rollouts with leases on one
    Redis drive one service: every act is made by the lease's holder of that moment; a holder frozen past its lease
    (its keeper stopped, its token kept) acts no more once the other has taken over."""
    import redis
    from conftest import REDIS_URL

    from rollout.lease import RedisLease

    client, key = redis.Redis.from_url(REDIS_URL), f"{redis_prefix}:rollout:lease"
    registry, acts = Registry(production=V2), []

    class Service(FakeTarget):  # the one function service both controllers drive
        def act_as(self, lease):
            service = self

            class Acting:
                name = "the function's service"

                def serving(self):
                    return service.serving()

                def deploy(self, model):
                    acts.append((lease.token, (client.get(key) or b"").decode(), model.version))
                    service.deploy(model)

            return Acting()

    service = Service(V1)
    controllers = []
    for name in ("a", "b"):
        lease = RedisLease(client, key, ttl_seconds=1.5, margin_seconds=0.5, holder=name)
        rollout = Rollout("production", registry.resolve, service.act_as(lease), 0.05, 0.2, resync_seconds=0.1, lease=lease)
        controllers.append((lease, rollout))
    try:
        for lease, rollout in controllers:
            lease.start()
            rollout.start()
            time.sleep(0.2)
        first = next(lease for lease, _ in controllers if lease.held())
        deadline = time.monotonic() + 10
        while service.current != V2 and time.monotonic() < deadline:
            time.sleep(0.05)
        first._stop.set()  # frozen: it renews no more, and still believes it holds the lease until it checks
        first._thread.join()
        other = next(lease for lease, _ in controllers if lease is not first)
        deadline = time.monotonic() + 10
        while not other.held() and time.monotonic() < deadline:
            time.sleep(0.05)
        registry.aliases["production"] = V3
        for _, rollout in controllers:
            rollout.request("v3 promoted")
        deadline = time.monotonic() + 10
        while service.current != V3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for lease, rollout in controllers:
            rollout.stop()
            lease.stop()
    assert service.current == V3 and [version for _, _, version in acts] == ["2", "3"], acts
    assert all(token == holder for token, holder, _ in acts), acts  # each act by the holder of that moment
    assert acts[0][0].startswith(f"{first.holder}:") and acts[1][0].startswith(f"{other.holder}:")
    assert int(acts[1][0].split(":")[1]) > int(acts[0][0].split(":")[1])  # a later fence


def test_without_a_lease_store_the_controller_refuses_to_start_unless_told_it_is_alone():
    from dataclasses import replace

    from rollout.app import lease_for
    from rollout.lease import SingleInstance

    with pytest.raises(RuntimeError, match="no lease store: set ROLLOUT_LEASE_REDIS_URL"):
        lease_for(SETTINGS, None, dict)
    assert isinstance(lease_for(replace(SETTINGS, single_instance=True), None, dict), SingleInstance)
