"""The shadow analysis's readers on the real Pub/Sub emulator (issue 31): a message that is not an answer, or an
ack the emulator refuses, is counted and skipped, never the reader's end; the controller's /readyz is not
ready, naming the reader, while a reader has stopped or its subscription does not exist, and ready again after."""

from __future__ import annotations

import contextlib
import json
import sys
import time

import pytest
from conftest import unique
from google.api_core.exceptions import NotFound
from google.cloud import pubsub_v1

from rollout.analysis import LiveAnswers
from rollout.app import create_app, live_answers
from rollout.settings import RolloutSettings
from rollout.webhook import WebhookVerifier

pytestmark = pytest.mark.integration
DEADLINE = 60  # seconds: generous, for a machine shared with other work; every wait ends as soon as it can


def _until(condition, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.1)


class Stream:
    """A topic of the test's own with the controller's subscription on it (created on ``subscribe``)."""

    def __init__(self, project: str):
        self.publisher, self.admin = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        self.topic = self.publisher.topic_path(project, unique("results"))
        self.subscription = unique("controller-results")
        self.path = self.admin.subscription_path(project, self.subscription)
        self.publisher.create_topic(name=self.topic)

    def subscribe(self) -> None:
        # The shortest ack deadline the service allows: a message whose ack failed comes back soon.
        self.admin.create_subscription(name=self.path, topic=self.topic, ack_deadline_seconds=10)

    def publish(self, *bodies: bytes) -> None:
        for body in bodies:
            self.publisher.publish(self.topic, body).result(timeout=30)

    def close(self) -> None:
        with contextlib.suppress(NotFound):  # never created (a test that left it missing)
            self.admin.delete_subscription(subscription=self.path)
        self.publisher.delete_topic(topic=self.topic)


@pytest.fixture
def stream(emulators):
    stream = Stream(emulators.project)
    yield stream
    stream.close()


def _answer(ride: int, version: str) -> bytes:
    return json.dumps(
        {"ride_id": f"ride-{ride}", "duration_final": 10.0 + ride, "model_version": version, "answer_ms": 3.0}
    ).encode()


def _rides_answered(answers: LiveAnswers, version: str = "1") -> int:
    baseline, *_ = answers.window(version, "2", 0.0, 0.0)
    return len(baseline)


MALFORMED = [
    b"\xff not json, not even UTF-8",
    b"[1, 2, 3]",
    b'{"ride_id": "ride-x", "duration_final": "a few minutes", "model_version": "1"}',
    b'{"ride_id": ["ride-y"], "duration_final": 12.0, "model_version": "1"}',
    b'{"ride_id": "ride-z", "duration_final": 12.0, "answer_ms": "fast", "model_version": "1"}',
]


def test_a_reader_skips_messages_that_are_not_answers_and_keeps_counting_the_good_ones(emulators, stream):
    stream.subscribe()
    answers = LiveAnswers(emulators.project, [stream.subscription]).start()
    reader = answers.readers[stream.subscription]
    try:
        stream.publish(*MALFORMED)
        _until(lambda: reader.rejected == len(MALFORMED), "every malformed message read and skipped")
        stream.publish(*(_answer(i, "1") for i in range(5)))
        _until(lambda: _rides_answered(answers) == 5, "the five answers published after them counted")
        assert reader.received == 5 and reader.thread.is_alive() and answers.problems() == {}
    finally:
        answers.stop()


class AckRefusedOnce(pubsub_v1.SubscriberClient):
    """The real client; its first ack sends ids the emulator no longer knows (as an expired lease would be),
    which the emulator refuses with an error."""

    def __init__(self):
        super().__init__()
        self.refused: list[str] = []  # the ack ids of the refused ack

    def acknowledge(self, *, subscription, ack_ids, **kwargs):
        if not self.refused:
            self.refused = list(ack_ids)
            ack_ids = [f"{ack_id}-expired" for ack_id in ack_ids]
        return super().acknowledge(subscription=subscription, ack_ids=ack_ids, **kwargs)


def test_a_reader_survives_a_refused_ack_and_counts_the_messages_it_gets_again_once(emulators, stream):
    stream.subscribe()
    subscriber = AckRefusedOnce()
    answers = LiveAnswers(emulators.project, [stream.subscription], subscriber=subscriber).start()
    reader = answers.readers[stream.subscription]
    try:
        stream.publish(*(_answer(i, "1") for i in range(3)))
        _until(lambda: subscriber.refused, "an ack refused by the emulator")
        stream.publish(*(_answer(i, "1") for i in range(3, 6)))
        _until(lambda: _rides_answered(answers) == 6, "the answers published after the refused ack counted")
        # Those whose ack was refused come back after their ack deadline: read again, counted once.
        _until(lambda: reader.received >= 6 + len(subscriber.refused), "the messages whose ack failed delivered again")
        assert _rides_answered(answers) == 6 and reader.ack_failures == 1
        assert reader.thread.is_alive() and answers.problems() == {}
    finally:
        answers.stop()


def test_the_controllers_readyz_names_a_reader_whose_subscription_is_missing_or_that_stopped(emulators, stream):
    answers = LiveAnswers(emulators.project, [stream.subscription]).start()  # its subscription does not exist yet
    # The readers' details are the operator's (anyone else sees only up or down).
    settings = RolloutSettings("secret", "ride-duration", {"production": "function"}, 300, 0.05, 0.2, operator_token="op")
    client = create_app(settings, rollouts={}, verifier=WebhookVerifier("secret"), answers=answers).test_client()
    name = f"reader {stream.subscription}"

    def readiness() -> tuple[int, dict]:
        response = client.get("/readyz", headers={"Authorization": "Bearer op"})
        return response.status_code, response.get_json()

    try:
        _until(lambda: readiness()[0] == 503, "/readyz not ready while the subscription is missing")
        body = readiness()[1]
        assert body["status"] == "down" and "NotFound" in body["problems"][name]

        stream.subscribe()
        _until(lambda: readiness()[0] == 200, "/readyz ready once the subscription exists")
        stream.publish(_answer(1, "1"))
        _until(lambda: readiness()[1]["readers"][stream.subscription]["received"] == 1, "the reader reads again")

        answers.stop()  # the reader's thread ends, as a dead reader's would
        _until(lambda: readiness()[0] == 503, "/readyz not ready while the reader is stopped")
        assert readiness()[1]["problems"] == {name: "its reader has stopped"}
        answers.start()
        _until(lambda: readiness()[0] == 200, "/readyz ready once the reader runs again")
    finally:
        answers.stop()


def test_without_pubsub_installed_the_controller_fails_at_start_instead_of_reading_nothing(monkeypatch):
    """As the image without google-cloud-pubsub was: building the readers (create_app calls live_answers when
    gunicorn loads the service) raises, where it used to start threads that died unseen."""
    monkeypatch.setitem(sys.modules, "google.cloud.pubsub_v1", None)  # any import of it fails, as if not installed
    monkeypatch.delattr("google.cloud.pubsub_v1", raising=False)
    monkeypatch.delitem(sys.modules, "rollout.analysis")  # imported afresh, as in a new process
    settings = RolloutSettings("secret", "ride-duration", {}, 300, 0.05, 0.2, project="p", result_subscriptions=("results",))
    with pytest.raises(ImportError):
        live_answers(settings).stop()
