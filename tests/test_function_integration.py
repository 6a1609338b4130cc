"""The serving function under functions-framework, fed by a push subscription of the real Pub/Sub emulator,
loading its model by RUN_ID from gcp-storage-emulator."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import requests
from conftest import unique
from google.cloud import pubsub_v1

from devstack.processes import ServiceError, function_server
from devstack.pubsub import ensure_subscription, ensure_topic, pull_messages
from devstack.traffic import real_rides
from ride_contract.sklearn_features import rides_frame
from serving_function.model_store import find_model_uri

pytestmark = pytest.mark.integration

SIGNATURES = {"event": "predict_duration", "cloudevent": "predict_duration_cloudevent"}


@pytest.fixture(scope="module")
def march_rides():
    # Real rides as the backend sends them: validated, with its ride_id.
    return [{**ride, "ride_id": f"mar-{i}"} for i, (ride, _) in enumerate(real_rides(25, seed=1))]


class Stack:
    """Topics, subscriptions and a running function for one test."""

    def __init__(self, emulators, gcs_model, signature: str, tmp_path, run_id: str | None = None):
        result, _ = gcs_model
        self.project = emulators.project
        self.push, self.pull, self.dead = unique("push"), unique("pull"), unique("dead")
        for topic in (self.push, self.pull, self.dead):
            ensure_topic(self.project, topic)
        ensure_subscription(self.project, self.pull, self.pull + "-sub")
        ensure_subscription(self.project, self.dead, self.dead + "-sub")
        self.run_id = run_id or result.run_id
        env = {  # all the function is given: it takes nothing from this process's environment
            "GOOGLE_CLOUD_PROJECT": self.project,
            "PUBSUB_EMULATOR_HOST": emulators.pubsub_host,
            "STORAGE_EMULATOR_HOST": emulators.storage_url,
            "RUN_ID": self.run_id,
            "MODEL_BUCKET": f"gs://{emulators.bucket}",
            "MODEL_VERSION": str(result.version),
            "BACKEND_PULL_STREAM": self.pull,
            "BACKEND_DEADLETTER_STREAM": self.dead,
        }
        self.function = function_server(tmp_path, SIGNATURES[signature], signature, env)

    def start(self):
        self.function.start()
        ensure_subscription(self.project, self.push, self.push + "-sub", push_endpoint=self.function.url + "/")
        return self

    def publish(self, payloads: list[bytes]) -> None:
        client = pubsub_v1.PublisherClient()
        for future in [client.publish(client.topic_path(self.project, self.push), p) for p in payloads]:
            future.result(timeout=30)

    def results(self, count: int, timeout: float = 60):
        return [json.loads(m.data) for m in pull_messages(self.project, self.pull + "-sub", count, timeout)]

    def dead_letters(self, count: int, timeout: float = 60):
        return [json.loads(m.data) for m in pull_messages(self.project, self.dead + "-sub", count, timeout)]


@pytest.fixture
def stack_factory(emulators, gcs_model, tmp_path):
    started: list[Stack] = []

    def make(signature: str, run_id: str | None = None) -> Stack:
        stack = Stack(emulators, gcs_model, signature, tmp_path, run_id)
        started.append(stack)
        return stack

    yield make
    for stack in started:
        stack.function.stop()


@pytest.mark.parametrize("signature", sorted(SIGNATURES))
def test_rides_pushed_to_the_function_come_back_on_the_pull_topic(signature, stack_factory, gcs_model, march_rides, monkeypatch):
    import mlflow

    result, settings = gcs_model
    stack = stack_factory(signature).start()
    stack.publish([json.dumps(r).encode() for r in march_rides])
    answers = {a["ride_id"]: a for a in stack.results(len(march_rides))}

    assert set(answers) == {r["ride_id"] for r in march_rides}
    # The function scores the serving form; the logged sklearn pipeline is the reference.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # our own model
    mlflow.set_tracking_uri(settings.tracking_uri)
    expected = mlflow.sklearn.load_model(result.model_uri).predict(rides_frame(march_rides))
    for ride, minutes in zip(march_rides, expected, strict=True):
        answer = answers[ride["ride_id"]]
        assert answer["duration_final"] == pytest.approx(minutes, abs=0.01)
        assert answer["duration_low"] <= answer["duration_final"] <= answer["duration_high"]
        assert answer["duration_high"] - answer["duration_low"] >= 1.0  # a range, not the answer repeated
        assert answer["model_run_id"] == result.run_id
        assert answer["model_version"] == str(result.version)


def test_poison_messages_land_in_the_dead_letter_topic_and_are_acked(stack_factory, march_rides):
    stack = stack_factory("event").start()
    poison = [b"{not json", json.dumps({**march_rides[0], "PULocationID": 0}).encode(), b"[]"]
    stack.publish([*poison, json.dumps(march_rides[1]).encode()])

    dead = stack.dead_letters(len(poison))
    assert sorted(base64.b64decode(d["data"]) for d in dead) == sorted(poison)
    assert all(d["reason"] for d in dead)
    # Acked, not retried: nothing more arrives, and the good ride was still answered.
    assert stack.dead_letters(1, timeout=5) == []
    assert [r["ride_id"] for r in stack.results(1)] == [march_rides[1]["ride_id"]]


def test_not_base64_push_is_dead_lettered_not_retried(stack_factory):
    stack = stack_factory("event").start()
    envelope = {"message": {"data": "***", "messageId": "77", "attributes": {}}, "subscription": "projects/p/subscriptions/s"}
    response = requests.post(stack.function.url + "/", json=envelope, timeout=30)
    assert response.status_code < 300
    [dead] = stack.dead_letters(1)
    assert "base64" in dead["reason"] and dead["message_id"] == "77"


def test_duplicate_delivery_yields_one_logical_result(stack_factory, march_rides):
    stack = stack_factory("cloudevent").start()
    ride = json.dumps(march_rides[2]).encode()
    stack.publish([ride, ride, ride])
    answers = stack.results(3, timeout=8)  # 1 to 3 copies, depending on how the deliveries overlap
    # However often it is delivered, the ride gets one prediction: the same result each time.
    assert {json.dumps(a, sort_keys=True) for a in answers} == {json.dumps(answers[0], sort_keys=True)}
    assert answers[0]["ride_id"] == march_rides[2]["ride_id"]
    logged = stack.function.log_path.read_text()
    assert logged.count('"message": "prediction"') == 1


def test_wrong_run_id_fails_the_cold_start_naming_where_it_looked(stack_factory, emulators):
    stack = stack_factory("event", run_id="0" * 32)
    with pytest.raises(ServiceError, match=rf"no model logged by run {'0' * 32} under gs://{emulators.bucket}"):
        stack.function.start(timeout=120)


def test_model_prefix_is_a_folder_not_a_string_prefix(emulators):
    from google.cloud import storage

    from serving_function.model_store import ModelNotFound

    bucket = storage.Client().bucket(emulators.bucket)
    run_id = uuid.uuid4().hex
    bucket.blob("prefix-test/10/models/m-0a1b/artifacts/MLmodel").upload_from_string(
        f"run_id: {run_id}\nflavors:\n  sklearn:\n    pickled_model: model.pkl\n"
    )
    found = find_model_uri(emulators.bucket, run_id, "prefix-test/10")
    assert found == f"gs://{emulators.bucket}/prefix-test/10/models/m-0a1b/artifacts"
    with pytest.raises(ModelNotFound, match="no model logged by run"):
        find_model_uri(emulators.bucket, run_id, "prefix-test/1")  # experiment 1 is not experiment 10


def test_a_cold_start_downloads_only_what_it_serves_with_and_keeps_none_of_it(emulators, gcs_model, tmp_path, monkeypatch):
    from serving_function import model_store

    result, _ = gcs_model
    seen: list[set[str]] = []
    download = model_store._download_folder

    def recording(uri, dest):  # what lands in the temporary folder, looked at before it is removed
        download(uri, dest)
        seen.append({p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()})

    monkeypatch.setattr(model_store, "_download_folder", recording)
    loaded = model_store.load_model(find_model_uri(emulators.bucket, result.run_id), cache_dir=tmp_path)
    [downloaded] = seen
    assert list(tmp_path.iterdir()) == []  # on Cloud Functions /tmp is memory: nothing stays behind
    assert {"MLmodel", "extra_files/serving_form.npz", "code/ride_contract/serving_form.py"} <= downloaded
    assert {"extra_files/interval.json", "extra_files/serving_form_low.npz", "extra_files/serving_form_high.npz"} <= downloaded
    assert "extra_files/reference_rides.json" not in downloaded  # the rollout's pre-flight reads it, not a cold start
    assert not {"model.pkl", "input_example.json", "requirements.txt", "conda.yaml"} & downloaded
    assert all(p == "MLmodel" or p.startswith(("code/", "extra_files/")) for p in downloaded)
    assert loaded.model.kind == "hist_gradient_boosting"
