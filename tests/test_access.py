"""Issue 31: every identity's rights come from what its code is seen to touch. The recording proxies forward the
real clients' calls to the real emulators and record, per identity, exactly what they did; the grants are read
from infra/; the comparison fails both ways (a use not granted, a grant unused)."""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid

import pytest
from conftest import unique

from devstack.access.grants import (
    DOCS_PAGE,
    DOCS_RECORD,
    LOCAL_TO_INFRA,
    NOT_EXERCISED,
    Grant,
    NotExercised,
    compare,
    docs_page,
    in_infra,
    parse_grants,
    render,
)
from devstack.access.record import Use, read_record, record_use
from devstack.access.recorder import AccessRecorder, IdentityPorts, identity_env, read_ports, recorder_service
from devstack.access.storage_proxy import storage_uses
from devstack.stack import BUCKET, SUBSCRIPTIONS, TOPICS

MODELS = f"bucket:{BUCKET}"
FREE = IdentityPorts(0, 0)


def wait_for(condition, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not met within {timeout} s")


@pytest.fixture
def recorder(emulators, tmp_path):
    with AccessRecorder(
        emulators.pubsub_host,
        emulators.storage_url,
        tmp_path / "access.jsonl",
        {"training": FREE, "function": FREE, "backend": FREE, "rollout": FREE, "operator": FREE},
    ) as started:
        yield started


@pytest.fixture
def as_identity(recorder, monkeypatch):
    """Make clients built inside it reach the emulators through ``identity``'s proxies (the clients read the
    *_EMULATOR_HOST variables when they are built)."""

    def build(identity: str, make):
        with monkeypatch.context() as patch:
            for name, value in recorder.env(identity).items():
                patch.setenv(name, value)
            return make()

    return build


def uses_of(recorder: AccessRecorder, identity: str) -> set[tuple[str, str, str]]:
    return {(u.service, u.resource, u.action) for u in read_record(recorder.record_file) if u.identity == identity}


def test_storage_calls_pass_through_the_proxy_and_are_recorded_per_identity(recorder, as_identity, monkeypatch):
    from google.cloud import storage

    # The client's own background fetch of the bucket's metadata (for its trace spans) races the assertions;
    # it is recorded as a bucket_get like any other (test_a_bucket_get_is_recorded_apart_from_reads).
    monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
    training = as_identity("training", lambda: storage.Client(project="ridestream-local"))
    function = as_identity("function", lambda: storage.Client(project="ridestream-local"))
    prefix = f"access-{uuid.uuid4().hex[:8]}"
    small, large = os.urandom(1000), os.urandom(9 * 1024 * 1024)  # the large one is over 8 MiB: a resumable upload
    bucket = training.bucket(BUCKET)
    bucket.blob(f"{prefix}/small").upload_from_string(small)
    bucket.blob(f"{prefix}/large", chunk_size=1024 * 1024).upload_from_string(large)  # nine chunks
    # Chunks of a resumable session go to the URL the emulator answered with: it must name the proxy.
    chunked = bucket.blob(f"{prefix}/chunked", chunk_size=256 * 1024)
    session = chunked.create_resumable_upload_session(size=len(small) * 600)
    assert session.startswith(recorder.storage["training"].url), session
    chunked.upload_from_string(small * 600)

    reader = function.bucket(BUCKET)
    assert reader.blob(f"{prefix}/small").download_as_bytes() == small
    assert reader.blob(f"{prefix}/large").download_as_bytes() == large
    assert reader.blob(f"{prefix}/chunked").download_as_bytes() == small * 600
    assert sorted(b.name for b in function.list_blobs(BUCKET, prefix=prefix)) == [
        f"{prefix}/{n}" for n in ("chunked", "large", "small")
    ]
    bucket.blob(f"{prefix}/small").delete()

    assert uses_of(recorder, "training") == {("storage", MODELS, "write"), ("storage", MODELS, "delete")}
    assert uses_of(recorder, "function") == {("storage", MODELS, "read")}
    assert uses_of(recorder, "backend") == set()
    assert not reader.blob(f"{prefix}/small").exists()  # a failed (404) metadata read passes through, recorded as a read


@pytest.mark.parametrize(
    ("method", "target", "body", "expected"),
    [
        ("GET", "/download/storage/v1/b/m/o/a%2Fb?alt=media", b"", [("bucket:m", "read")]),
        ("GET", "/storage/v1/b/m/o?prefix=x", b"", [("bucket:m", "read")]),
        ("POST", "/upload/storage/v1/b/m/o?uploadType=resumable", b"", [("bucket:m", "write")]),
        ("PATCH", "/storage/v1/b/m/o/a", b"", [("bucket:m", "update")]),  # objects.update: not objectCreator's
        ("DELETE", "/storage/v1/b/m/o/a", b"", [("bucket:m", "delete")]),
        ("POST", "/storage/v1/b/m/o/a/rewriteTo/b/o/o/a", b"", [("bucket:m", "read"), ("bucket:o", "write")]),
        ("POST", "/storage/v1/b/m/o/a/compose", b"", [("bucket:m", "read"), ("bucket:m", "write")]),
        ("GET", "/storage/v1/b/m", b"", [("bucket:m", "bucket_get")]),
        ("PATCH", "/storage/v1/b/m", b"", [("bucket:m", "bucket_admin")]),
        ("GET", "/storage/v1/b?project=p", b"", [("project", "bucket_list")]),
        ("GET", "/m/a/b", b"", [("bucket:m", "read")]),  # the XML API (signed URLs)
        ("POST", "/batch/storage/v1", b"--x\r\n\r\nDELETE /storage/v1/b/m/o/a HTTP/1.1\r\n", [("bucket:m", "delete")]),
        ("GET", "/", b"", []),  # the emulator's health check
    ],
)
def test_each_storage_request_is_recorded_as_what_it_does_to_which_bucket(method, target, body, expected):
    assert storage_uses(method, target, body) == expected


def test_a_bucket_get_is_recorded_apart_from_reads_and_refused_without_a_grant(recorder, as_identity):
    """Reading a bucket's metadata is storage.buckets.get, which objectViewer does not grant: a deployable whose
    code did it would be refused on Google Cloud. (The stack turns off the storage client's own background fetch
    of it, DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA, so every one recorded is our code's.)"""
    from google.cloud import storage

    assert as_identity("function", lambda: storage.Client(project="ridestream-local")).get_bucket(BUCKET).name == BUCKET
    assert uses_of(recorder, "function") == {("storage", MODELS, "bucket_get")}
    report = compare(in_infra(read_record(recorder.record_file)), parse_grants(), NOT_EXERCISED)
    assert report.not_granted == [(Use("function", "storage", "bucket:models", "bucket_get"), "roles/storage.legacyBucketReader")]


def test_pubsub_calls_pass_through_the_proxy_and_are_recorded_per_identity(recorder, as_identity, emulators):
    from google.api_core.exceptions import NotFound
    from google.cloud import pubsub_v1

    project = emulators.project
    topic, subscription = unique("access-topic"), unique("access-sub")
    operator = as_identity("operator", pubsub_v1.PublisherClient)
    operator_subscriber = as_identity("operator", pubsub_v1.SubscriberClient)
    topic_path, subscription_path = (
        operator.topic_path(project, topic),
        operator_subscriber.subscription_path(project, subscription),
    )
    operator.create_topic(name=topic_path)
    operator_subscriber.create_subscription(name=subscription_path, topic=topic_path)

    backend = as_identity("backend", pubsub_v1.PublisherClient)
    backend.get_topic(topic=topic_path)
    backend.publish(topic_path, b"ride-1").result(timeout=60)
    backend.publish(topic_path, b"ride-2").result(timeout=60)

    rollout = as_identity("rollout", pubsub_v1.SubscriberClient)
    pulled = wait_for(
        lambda: rollout.pull(subscription=subscription_path, max_messages=1, timeout=30).received_messages, what="a pull"
    )
    rollout.acknowledge(subscription=subscription_path, ack_ids=[m.ack_id for m in pulled])
    received = []
    future = rollout.subscribe(subscription_path, lambda message: (received.append(message.data), message.ack()))
    try:
        wait_for(lambda: received, what="a message through a streaming pull")
    finally:
        future.cancel()
    assert sorted([pulled[0].message.data, *received]) == [b"ride-1", b"ride-2"]
    # The emulator's NOT_FOUND reaches the client as itself.
    with pytest.raises(NotFound):
        rollout.get_subscription(subscription=operator_subscriber.subscription_path(project, "no-such-subscription"))

    topic_use, subscription_use = f"topic:{topic}", f"subscription:{subscription}"
    assert uses_of(recorder, "operator") == {
        ("pubsub", topic_use, "admin"),
        ("pubsub", subscription_use, "admin"),
        ("pubsub", topic_use, "attach"),
    }
    assert uses_of(recorder, "backend") == {("pubsub", topic_use, "view"), ("pubsub", topic_use, "publish")}
    assert uses_of(recorder, "rollout") == {
        ("pubsub", subscription_use, "consume"),
        ("pubsub", "subscription:no-such-subscription", "view"),
    }


def test_the_recorder_process_answers_records_at_once_and_its_record_survives_a_kill(emulators, tmp_path, monkeypatch):
    from google.cloud import storage

    record = tmp_path / "access.jsonl"
    ports_file = tmp_path / "ports.json"
    service, ports = recorder_service(
        tmp_path / "logs", record, ["function", "backend"], emulators.pubsub_host, emulators.storage_url, ports_file
    )
    with service.start(timeout=60):
        assert read_ports(ports_file) == ports  # for processes that start deployables of their own (the rollout target)
        health = json.load(urllib.request.urlopen(f"{service.url}/healthz", timeout=10))
        assert health["identities"]["function"] == {"pubsub": ports["function"].pubsub, "storage": ports["function"].storage}
        for name, value in identity_env(ports["function"]).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")  # see the first test
        blobs = list(storage.Client(project=emulators.project).list_blobs(BUCKET, max_results=1))
        assert blobs is not None
        record_use(record, "rollout", "run", "service:function", "deploy")
        expected = {Use("function", "storage", MODELS, "read"), Use("rollout", "run", "service:function", "deploy")}
        served = json.load(urllib.request.urlopen(f"{service.url}/record", timeout=10))
        assert {Use(**use) for use in served} == expected
        os.killpg(service.pid, 9)  # no chance to flush anything: the lines were written when first seen
        wait_for(lambda: service.process.poll() is not None, what="the recorder gone")
    assert read_record(record) == expected
    # A use recorded again (another process, a restarted recorder) adds no line.
    assert not record_use(record, "rollout", "run", "service:function", "deploy")
    assert len(record.read_text().splitlines()) == 2


def test_the_parser_finds_infras_grants_for_each_identity():
    grants = {(g.identity, g.resource, g.role) for g in parse_grants()}
    assert ("function", "bucket:models", "roles/storage.objectViewer") in grants
    assert ("pubsub_agent", "bucket:outcomes", "roles/storage.objectCreator") in grants
    assert ("google_logging_project_sink.predictions", "bucket:prediction_logs", "roles/storage.objectCreator") in grants
    assert ("var.backend_invokers", "run_service:backend", "roles/run.invoker") in grants
    assert ("rollout", "service_account:function", "roles/iam.serviceAccountUser") in grants
    # A for_each grant: one per subscription of the for_each it runs over.
    assert {r for i, r, role in grants if i == "rollout" and role == "roles/pubsub.subscriber"} == {
        f'subscription:rollout_analysis["{key}"]' for key in ("pull", "shadow", "deadletter", "outcomes")
    }


def test_the_rollout_controller_may_read_the_models_it_loads_at_pre_flight(recorder, gcs_model, monkeypatch):
    """Issue 31: pre-flight (rollout.preflight, the controller's own code) loads the candidate from the models
    bucket as the rollout identity; infra/ must grant that read, or every promotion is blocked on Google Cloud."""
    from rollout import preflight
    from serving_function.model_store import find_model_uri

    result, _ = gcs_model
    model_uri = find_model_uri(BUCKET, result.run_id, "mlflow")  # as the test, not through any identity's proxy
    for name, value in recorder.env("rollout").items():
        monkeypatch.setenv(name, value)  # pre-flight runs in a process of its own, with this environment
    monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
    verdict = preflight.run(model_uri, result.run_id)
    assert verdict.passed, verdict.reason
    assert uses_of(recorder, "rollout") == {("storage", MODELS, "read")}
    report = compare(in_infra(read_record(recorder.record_file)), parse_grants(), NOT_EXERCISED)
    assert report.not_granted == [], report.lines()


def test_local_names_map_onto_infra_and_people_only_subscriptions_onto_nothing():
    assert LOCAL_TO_INFRA[f"subscription:{SUBSCRIPTIONS['pull']}"] == "subscription:backend_results"
    assert LOCAL_TO_INFRA[f"subscription:{SUBSCRIPTIONS['analysis_pull']}"] == 'subscription:rollout_analysis["pull"]'
    assert LOCAL_TO_INFRA[f"topic:{TOPICS['dead']}"] == "topic:deadletter"
    assert LOCAL_TO_INFRA[f"subscription:{SUBSCRIPTIONS['dead_watch']}"] is None
    infra_resources = {g.resource for g in parse_grants()} | {
        f"topic:{t}" for t in ("push", "pull", "deadletter", "shadow", "outcomes")
    }
    subscriptions_in_infra = {"deadletter_inspect", "function_shadow_push", "function_push", "outcomes_to_storage"}
    infra_resources |= {f"subscription:{name}" for name in subscriptions_in_infra}
    assert {name for name in LOCAL_TO_INFRA.values() if name} <= infra_resources
    # A deploy of the function acts as the function's account: the rollout's serviceAccountUser grant is used.
    deployed = in_infra({Use("rollout", "run", "service:function", "deploy")})
    assert Use("rollout", "iam", "service_account:function", "act_as") in deployed


GRANTS = [
    Grant("function", "bucket:models", "roles/storage.objectViewer", "function_reads_models"),
    Grant("function", "topic:pull", "roles/pubsub.publisher", "function_publishes_results"),
    Grant("pusher", "run_service:predict", "roles/run.invoker", "pusher_invokes_function"),
]
INVOKE = NotExercised("pusher", "run_service:predict", "roles/run.invoker", "no OIDC locally")


def test_the_comparison_fails_on_a_use_not_granted_and_on_a_grant_unused():
    record = {
        Use("function", "storage", "bucket:models", "read"),
        Use("function", "storage", "bucket:models", "write"),  # not granted
    }
    report = compare(record, GRANTS, [INVOKE])
    assert report.not_granted == [(Use("function", "storage", "bucket:models", "write"), "roles/storage.objectCreator")]
    assert report.unused == [GRANTS[1]]  # nothing was published: the publisher grant is not needed
    assert not report.ok
    assert compare(
        record - {Use("function", "storage", "bucket:models", "write")} | {Use("function", "pubsub", "topic:pull", "publish")},
        GRANTS,
        [INVOKE],
    ).ok
    # Without its entry in the not-exercised list, the invoker grant is unused too; an entry matching no grant is stale.
    assert GRANTS[2] in compare(record, GRANTS, []).unused
    stale = NotExercised("pusher", "run_service:other", "roles/run.invoker")
    assert compare(record, GRANTS, [INVOKE, stale]).stale == [stale]


def test_a_role_broader_than_what_was_used_is_noted_without_failing():
    writer = Grant("training", "bucket:models", "roles/storage.objectUser", "training_writes_models")
    report = compare({Use("training", "storage", "bucket:models", "write")}, [writer], [])
    assert report.ok and report.narrower == [(writer, "roles/storage.objectCreator")]
    assert not compare({Use("training", "storage", "bucket:models", "delete")}, [writer], []).narrower
    assert "| write (storage.objectCreator would do, if it never overwrites an object: not told apart here) |" in render(
        report, []
    )


def test_the_comparison_on_infra_flags_what_the_record_does_not_show():
    grants = parse_grants()
    assert compare(set(), grants, NOT_EXERCISED).stale == []  # every not-exercised entry names a grant of infra/
    function_only_publishes = in_infra({Use("function", "pubsub", f"topic:{TOPICS['pull']}", "publish")})
    report = compare(function_only_publishes, grants, NOT_EXERCISED)
    unused = {g.address for g in report.unused}
    assert "google_storage_bucket_iam_member.function_reads_models" in unused
    assert "google_pubsub_topic_iam_member.function_publishes_results" not in unused
    assert not any("run.invoker" in g.role or "cloudsql" in g.role for g in report.unused)
    # The backend reading a people-only subscription is no grant of infra/.
    peeking = in_infra({Use("backend", "pubsub", f"subscription:{SUBSCRIPTIONS['dead_watch']}", "consume")})
    assert compare(peeking, grants, NOT_EXERCISED).not_granted == [
        (Use("backend", "pubsub", f"local-only:subscription:{SUBSCRIPTIONS['dead_watch']}", "consume"), "roles/pubsub.subscriber")
    ]


def test_the_identity_page_is_rendered_from_the_same_data_deterministically():
    record = in_infra({Use("function", "storage", MODELS, "read"), Use("function", "storage", MODELS, "write")})
    page = render(compare(record, parse_grants(), NOT_EXERCISED), NOT_EXERCISED)
    assert page == render(compare(set(record), list(reversed(parse_grants())), NOT_EXERCISED), NOT_EXERCISED)
    assert (
        "| function | storage.objectViewer on `bucket:models` | read | `google_storage_bucket_iam_member.function_reads_models` |"
        in page
    )
    assert "| function | **no grant** | write on `bucket:models` (needs roles/storage.objectCreator) | — |" in page
    assert "not exercisable locally: the emulator pushes without an OIDC token" in page
    assert len([line for line in page.splitlines() if line.startswith("| ") and "---" not in line]) == 1 + len(parse_grants()) + 1


def test_the_identity_page_is_what_infra_and_the_record_beside_it_make():
    """docs/identities.md cannot drift from infra/ or from the record it shows (a stack run's, which
    tests/test_rollout_faults.py checks is what the stack does): regenerate it with `python -m
    devstack.access.report --record docs/identities.record.jsonl --write-docs`."""
    assert DOCS_RECORD.exists(), "the page shows no record of a stack run"
    assert DOCS_PAGE.read_text() == docs_page()
