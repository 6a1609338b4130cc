"""Judge a candidate version against the version serving, on the same live rides.

The shadow deployment answers every ride that production answers (riders see only
production's answer), so each ride is answered by both versions: the judge compares them
pair by pair, not as two distributions. The same figures are watched again during the bake,
with the roles of the two deployments swapped (the candidate answers riders, the version it
replaced answers in shadow).

``LiveAnswers`` reads the results both deployments publish, and the dead letters, from
subscriptions of the controller's own; ``figures`` and ``breaches`` are pure functions of
what it read, so tests judge real models' answers without a stream.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

# At import, not in a reader thread: an image without google-cloud-pubsub fails when the service
# loads, instead of starting with readers that die unseen (issue 31).
from google.api_core import exceptions
from google.cloud import pubsub_v1
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ride_contract.outcome import CompletedRide
from ride_contract.quality import paired_rmse_difference
from rollout.settings import AnalysisSettings

log = logging.getLogger("rollout")
KEPT_RIDES = 200_000  # answers remembered (a few hundred bytes each)


@dataclass(frozen=True)
class Answer:
    duration: float  # minutes, as served
    clipped: bool
    answer_ms: float | None
    at: float  # when the controller read it (Unix seconds)


def figures(
    baseline: list[Answer],
    candidate: list[Answer | None],
    candidate_dead_letters: int = 0,
    baseline_dead_letters: int = 0,
    actual: list[float | None] | None = None,
    settings: AnalysisSettings | None = None,
    interval: bool = True,
) -> dict[str, Any]:
    """The analysis figures of rides answered by the baseline; ``candidate[i]`` is None where the candidate
    gave no answer for ride i. ``actual[i]``: the ride's actual duration where it has come back.

    ``outcomes`` (always there): the paired rides whose actual duration has come back, so a phase can wait
    for them. ``interval``: add the paired RMSE difference and its bootstrap interval (rmse_diff_minutes,
    rmse_diff_ci95) once ``min_outcomes`` have come back; it resamples every outcome, so a watch loop passes
    False and asks for it once, at the phase's decision."""
    settings = settings or AnalysisSettings()
    rides = len(baseline)
    paired = [(b, c) for b, c in zip(baseline, candidate, strict=True) if c is not None]
    known = (
        [(b_, c_, a) for b_, c_, a in zip(baseline, candidate, actual, strict=True) if c_ is not None and a is not None]
        if actual is not None
        else []
    )
    out: dict[str, Any] = {"rides": rides, "paired": len(paired), "outcomes": len(known)}
    if not rides:
        return out
    out["missing_rate"] = round(1 - len(paired) / rides, 4)
    out["extra_dead_letter_rate"] = round(max(0, candidate_dead_letters - baseline_dead_letters) / rides, 4)
    if not paired:
        return out
    b = np.array([p[0].duration for p in paired])
    c = np.array([p[1].duration for p in paired])
    diff = c - b
    out["median_abs_diff_minutes"] = round(float(np.median(np.abs(diff))), 3)
    out["mean_diff_minutes"] = round(float(np.mean(diff)), 3)
    out["extra_clipped_rate"] = round((sum(p[1].clipped for p in paired) - sum(p[0].clipped for p in paired)) / len(paired), 4)
    latencies = [p[1].answer_ms for p in paired if p[1].answer_ms is not None]
    out["p95_answer_ms"] = round(float(np.percentile(latencies, 95)), 2) if latencies else None
    if interval and len(known) >= settings.min_outcomes:
        low, mid, high = paired_rmse_difference(
            np.array([c_.duration for _, c_, _ in known]),
            np.array([b_.duration for b_, _, _ in known]),
            np.array([a for _, _, a in known]),
            settings.bootstrap_samples,
        )
        out["rmse_diff_minutes"] = round(mid, 3)
        out["rmse_diff_ci95"] = [round(low, 3), round(high, 3)]
    return out


def breaches(figs: dict[str, Any], settings: AnalysisSettings) -> list[str]:
    """Each threshold the figures break, in words; empty: the candidate passes."""
    found = []

    def over(key: str, limit: float, text: str) -> None:
        value = figs.get(key)
        if value is not None and value > limit:
            found.append(f"{text} {value} > {limit}")

    over("missing_rate", settings.max_missing_rate, "rides left unanswered")
    over("extra_dead_letter_rate", settings.max_extra_dead_letter_rate, "extra dead letters per ride")
    over("extra_clipped_rate", settings.max_extra_clipped_rate, "extra out-of-bounds answers per ride")
    over("p95_answer_ms", settings.max_p95_answer_ms, "p95 answer ms")
    over("median_abs_diff_minutes", settings.max_median_abs_diff_minutes, "median |candidate - serving| min")
    if figs.get("mean_diff_minutes") is not None and abs(figs["mean_diff_minutes"]) > settings.max_abs_mean_diff_minutes:
        found.append(f"mean candidate - serving {figs['mean_diff_minutes']} min, beyond ±{settings.max_abs_mean_diff_minutes}")
    if figs.get("rmse_diff_ci95") and figs["rmse_diff_ci95"][0] > settings.max_rmse_increase_minutes:
        found.append(f"RMSE worse by {figs['rmse_diff_ci95'][0]}+ min (95 % CI) > {settings.max_rmse_increase_minutes}")
    if figs.get("rides") and not figs.get("paired"):
        found.append("the candidate answered none of the rides")
    return found


class PublishedAnswer(BaseModel):
    """What the controller reads of a result message (ride_contract.result.RideResult, or any newer form)."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    ride_id: str = Field(min_length=1)
    duration_final: float
    clipped: bool = False
    answer_ms: float | None = None
    model_version: str | None = None


class DeadLetter(BaseModel):
    """What the controller reads of a dead letter: the version that refused the ride."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    model_version: str


@dataclass
class Reader:
    """One subscription's reader thread and what it has seen: /readyz reports a reader that is not reading."""

    subscription: str
    thread: threading.Thread | None = None
    error: str | None = None  # why the last pull failed; None once one succeeds
    received: int = 0  # messages read and kept
    rejected: int = 0  # messages that were not an answer, outcome or dead letter (acked, skipped)
    ack_failures: int = 0  # acks that failed (the messages come again; a repeated one is counted once)

    def problem(self) -> str | None:
        if self.thread is None or not self.thread.is_alive():
            return "its reader has stopped"
        return self.error

    def summary(self) -> dict[str, Any]:
        return {
            "problem": self.problem(),
            "received": self.received,
            "rejected": self.rejected,
            "ack_failures": self.ack_failures,
        }


class LiveAnswers:
    """The answers of every deployment, by ride and version, read from the controller's own subscriptions.

    Results arrive from production's result topic and the shadow's; dead letters from the dead-letter
    topic (each carries the version that refused the ride). Unary pulls, acked once read: what the
    controller reads is a copy (its subscriptions), never what the backends or the function consume.
    A reader lives as long as the controller: a failed pull or ack, or a message it cannot read, is
    logged and counted, never the end of it; ``problems`` says which reader is not reading and why."""

    def __init__(
        self,
        project: str,
        result_subscriptions: list[str],
        deadletter_subscription: str = "",
        outcome_subscription: str = "",
        subscriber: Any = None,
    ):
        self.project = project
        self.subscriptions = [s for s in result_subscriptions if s]
        self.deadletter_subscription = deadletter_subscription
        self.outcome_subscription = outcome_subscription  # completed rides: the actual durations, where they come back
        # Made here, at start, not in a reader thread: a missing package or credential fails the service's start.
        self._subscriber = subscriber if subscriber is not None else pubsub_v1.SubscriberClient()
        self._actual: OrderedDict[str, float] = OrderedDict()  # ride_id -> actual minutes
        self._answers: OrderedDict[str, dict[str, Answer]] = OrderedDict()  # ride_id -> version -> answer
        self._first_seen: dict[str, float] = {}  # ride_id -> when its first answer reached this reader
        self._first_published: dict[str, float] = {}  # ride_id -> when its first answer was published
        # message id -> (at, model_version): a dead letter delivered again (its ack failed) counts once
        self._dead: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        names = [*self.subscriptions, deadletter_subscription, outcome_subscription]
        self.readers = {name: Reader(name) for name in names if name}
        self.started_at = time.time()

    def start(self) -> LiveAnswers:
        """Start every reader that is not running (all of them, the first time)."""
        self._stop.clear()
        for reader in self.readers.values():
            if reader.thread is None or not reader.thread.is_alive():
                reader.thread = threading.Thread(
                    target=self._read, args=(reader,), name=f"answers-{reader.subscription}", daemon=True
                )
                reader.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def problems(self) -> dict[str, str]:
        """subscription -> why its reader is not reading (it stopped, or its last pull failed); empty when all read."""
        return {name: problem for name, reader in self.readers.items() if (problem := reader.problem())}

    def _read(self, reader: Reader) -> None:
        path = self._subscriber.subscription_path(self.project, reader.subscription)
        while not self._stop.is_set():
            try:
                self._read_once(reader, path)
            except Exception as exc:  # the stream is down or the subscription is gone: the figures wait
                reader.error = f"{type(exc).__name__}: {exc}"
                log.warning("analysis: reading %s: %s", reader.subscription, reader.error)
                self._stop.wait(1)

    def _read_once(self, reader: Reader, path: str) -> None:
        try:
            response = self._subscriber.pull(subscription=path, max_messages=500, timeout=2)
        except exceptions.DeadlineExceeded:  # nothing to read within the pull's time: the subscription answers
            reader.error = None
            return
        reader.error = None
        if not response.received_messages:
            return
        for received in response.received_messages:
            if self._take(reader.subscription, received):
                reader.received += 1
            else:
                reader.rejected += 1
        try:
            self._subscriber.acknowledge(subscription=path, ack_ids=[m.ack_id for m in response.received_messages])
        except Exception as exc:  # they come again after their ack deadline; what was kept stays kept once
            reader.ack_failures += 1
            log.warning("analysis: acking %s: %s: %s", reader.subscription, type(exc).__name__, exc)

    def _take(self, subscription: str, received: Any) -> bool:
        """One message, kept if it is what the subscription carries; any message that is not is skipped."""
        published = received.message.publish_time
        at = published.timestamp() if published else None
        try:
            if subscription == self.outcome_subscription:
                return self.record_outcome(received.message.data)
            dead_letter = subscription == self.deadletter_subscription
            return self.record(received.message.data, dead_letter=dead_letter, at=at, message_id=received.message.message_id)
        except Exception as exc:  # a message nobody foresaw: skipped, never the reader's end
            log.warning("analysis: a message on %s skipped: %s: %s", subscription, type(exc).__name__, exc)
            return False

    def record_outcome(self, data: bytes) -> bool:
        """A completed ride (the outcomes topic): its actual duration, for the paired RMSE difference."""
        try:
            ride = CompletedRide.model_validate_json(data)
        except ValidationError:
            return False
        with self._lock:
            self._actual[ride.ride_id] = ride.actual_minutes
            while len(self._actual) > KEPT_RIDES:
                self._actual.popitem(last=False)
        return True

    def record(self, data: bytes, dead_letter: bool = False, at: float | None = None, message_id: str = "") -> bool:
        """One answer (or dead letter); ``at``: when it was published (Pub/Sub's publish time), else now.
        False: not an answer (or a dead letter) this controller can read; skipped."""
        seen = time.time()
        at = seen if at is None else at
        if dead_letter:
            try:
                version = DeadLetter.model_validate_json(data).model_version
            except ValidationError:
                return False  # not ours to judge (Pub/Sub's own forward of a raw ride is counted by the function's letter)
            with self._lock:
                self._dead.setdefault(message_id or uuid.uuid4().hex, (at, version))
                while len(self._dead) > KEPT_RIDES:
                    self._dead.popitem(last=False)
            return True
        try:
            body = PublishedAnswer.model_validate_json(data)
        except ValidationError:
            return False
        answer = Answer(body.duration_final, body.clipped, body.answer_ms, at)
        with self._lock:
            ride = self._answers.setdefault(body.ride_id, {})
            ride.setdefault(body.model_version or "", answer)  # a repeated result keeps the first
            self._first_seen.setdefault(body.ride_id, seen)
            self._first_published.setdefault(body.ride_id, at)
            while len(self._answers) > KEPT_RIDES:
                old, _ = self._answers.popitem(last=False)
                self._first_seen.pop(old, None)
                self._first_published.pop(old, None)
        return True

    def window(self, baseline: str, candidate: str, since: float, grace_seconds: float) -> tuple[list, list, int, int, list]:
        """Rides the baseline answered since ``since``, old enough that the candidate had ``grace_seconds``
        to answer too: (baseline answers, candidate answers or None, candidate's and baseline's dead letters,
        actual durations or None where no outcome has come back).

        Only rides answered after this reader started count: of earlier ones, a controller killed before
        it may have taken one half of the pair with it (acked, never kept), which would read as unanswered."""
        now = time.time()
        since = max(since, self.started_at)
        with self._lock:
            # Published in the window; seen here long enough ago that the other answer had time to arrive
            # (a backlog read after a restart arrives late, however early it was published).
            rides = [
                (ride_id, answers)
                for ride_id, answers in self._answers.items()
                if baseline in answers
                and since <= self._first_published[ride_id]
                and self._first_seen[ride_id] <= now - grace_seconds
            ]
            dead = [version for at, version in self._dead.values() if since <= at <= now - grace_seconds]
            actual = [self._actual.get(ride_id) for ride_id, _ in rides]
        return (
            [answers[baseline] for _, answers in rides],
            [answers.get(candidate) for _, answers in rides],
            dead.count(candidate),
            dead.count(baseline),
            actual,
        )
