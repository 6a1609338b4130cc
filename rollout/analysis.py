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
import math
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
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
# What one kept ride costs, its two answers and its outcome included (tests/test_analysis.py measures it):
# AnalysisSettings.max_kept_rides rides cost at most this many bytes each.
KEPT_RIDE_BYTES = 600
# Pub/Sub's publish time against this controller's clock: a ride first seen this long before a window
# opened was published before it (the window's scan stops there instead of reading every kept ride).
CLOCK_SKEW_SECONDS = 60.0
EVICTION_LOG_SECONDS = 60.0  # at most one warning a minute about rides evicted early


@dataclass(frozen=True, slots=True)
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
    if interval and known and len(known) >= settings.min_outcomes:  # none: nothing to resample
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


# What a candidate's answers themselves say (not how fast or how many came back): on the shadow's minimum of
# rides a breach of these is the model's, which more rides or outcomes will not undo; a rate of missing or
# late answers can be a new revision's first seconds (scaling out, a Pub/Sub push backing off), and waits.
ANSWER_FIGURES = ("rides", "paired", "median_abs_diff_minutes", "mean_diff_minutes", "extra_clipped_rate")


def answer_breaches(figs: dict[str, Any], settings: AnalysisSettings) -> list[str]:
    """The breaches of ``ANSWER_FIGURES`` only, once the candidate has answered: none answered yet (a revision
    still starting) is a missing rate, which waits."""
    if not figs.get("paired"):
        return []
    return breaches({key: figs[key] for key in ANSWER_FIGURES if key in figs}, settings)


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


class _Kept:
    """One ride as kept until its outcome can come back: when it was first seen here and first published,
    each version's answer (a flat tuple: version, answer, ...; smaller than a dict), and its actual duration
    (the first). Answers stay objects, not packed bytes: a watch reads every ride of its window each 0.5 s
    (100k rides: 0.12 s as objects, 0.41 s unpacking ~110 bytes smaller rides)."""

    __slots__ = ("actual", "answers", "published", "seen")

    def __init__(self, seen: float, published: float):
        self.seen, self.published = seen, published
        self.answers: tuple = ()
        self.actual: float | None = None

    def answer(self, version: str) -> Answer | None:
        for i in range(0, len(self.answers), 2):
            if self.answers[i] == version:
                return self.answers[i + 1]
        return None


class LiveAnswers:
    """The answers of every deployment, by ride and version, read from the controller's own subscriptions.

    Results arrive from production's result topic and the shadow's; dead letters from the dead-letter
    topic (each carries the version that refused the ride). Unary pulls, acked once read: what the
    controller reads is a copy (its subscriptions), never what the backends or the function consume.
    A reader lives as long as the controller: a failed pull or ack, or a message it cannot read, is
    logged and counted, never the end of it; ``problems`` says which reader is not reading and why.

    A ride is kept until its outcome can have come back (``AnalysisSettings.answer_retention_seconds``:
    the longest ride after the phase windows close), in ``KEPT_RIDE_BYTES`` a ride; beyond
    ``max_kept_rides`` the oldest go first, and one evicted before its retention ended (traffic beyond
    max_kept_rides / retention rides a second) is counted in ``kept()`` and logged, never silently.
    The first outcome of a ride is its outcome: a repeat is counted and ignored (issue 33)."""

    def __init__(
        self,
        project: str,
        result_subscriptions: list[str],
        deadletter_subscription: str = "",
        outcome_subscription: str = "",
        subscriber: Any = None,
        settings: AnalysisSettings | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.project = project
        self.subscriptions = [s for s in result_subscriptions if s]
        self.deadletter_subscription = deadletter_subscription
        self.outcome_subscription = outcome_subscription  # completed rides: the actual durations, where they come back
        # Made here, at start, not in a reader thread: a missing package or credential fails the service's start.
        self._subscriber = subscriber if subscriber is not None else pubsub_v1.SubscriberClient()
        settings = settings or AnalysisSettings()
        self.retention_seconds = settings.answer_retention_seconds()
        self.max_rides = settings.max_kept_rides
        self._clock = clock
        self._rides: dict[str, _Kept] = {}  # ride_id -> what it got
        self._order: deque[str] = deque()  # ride ids, first seen first: evicted from the left
        # Outcomes of rides not (yet) answered here: attached when the ride's first answer arrives.
        self._early_outcomes: OrderedDict[str, tuple[float, float]] = OrderedDict()  # ride_id -> (seen, minutes)
        # message id -> (at, model_version): a dead letter delivered again (its ack failed) counts once
        self._dead: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self.evicted_early = 0  # rides evicted by the count guard before their retention ended
        self.repeated_outcomes = 0  # outcomes of a ride that already had one: ignored
        self._last_eviction_log = -math.inf
        self._lock = threading.Lock()
        self._stop = threading.Event()
        names = [*self.subscriptions, deadletter_subscription, outcome_subscription]
        self.readers = {name: Reader(name) for name in names if name}
        self.started_at = clock()

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

    def kept(self) -> dict[str, Any]:
        """What is kept, and what was lost: rides evicted before their outcome could come back, repeated outcomes."""
        with self._lock:
            return {
                "rides": len(self._rides),
                "retention_seconds": self.retention_seconds,
                "max_rides": self.max_rides,
                "evicted_before_outcomes": self.evicted_early,
                "repeated_outcomes": self.repeated_outcomes,
            }

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

    def _evict(self, now: float) -> None:
        """Forget what is older than the retention, and beyond the count guard the oldest (counted). Under the lock."""
        horizon = now - self.retention_seconds
        early = 0
        while self._order:
            oldest = self._rides[self._order[0]]
            if oldest.seen >= horizon and len(self._rides) <= self.max_rides:
                break
            early += oldest.seen >= horizon
            del self._rides[self._order.popleft()]
        while self._early_outcomes and (
            next(iter(self._early_outcomes.values()))[0] < horizon or len(self._early_outcomes) > self.max_rides
        ):
            self._early_outcomes.popitem(last=False)
        while self._dead and (next(iter(self._dead.values()))[0] < horizon or len(self._dead) > self.max_rides):
            self._dead.popitem(last=False)
        if early:
            self.evicted_early += early
            if now - self._last_eviction_log >= EVICTION_LOG_SECONDS:
                self._last_eviction_log = now
                log.warning(
                    "analysis: %d rides evicted before their outcomes could come back (more than %d rides in %.0f s; "
                    "raise ROLLOUT_MAX_KEPT_RIDES and the controller's memory, %d bytes a ride)",
                    self.evicted_early,
                    self.max_rides,
                    self.retention_seconds,
                    KEPT_RIDE_BYTES,
                )

    def record_outcome(self, data: bytes) -> bool:
        """A completed ride (the outcomes topic): its actual duration, for the paired RMSE difference.
        The first outcome of a ride is kept; a repeat is counted and ignored (a rider cannot restate it)."""
        try:
            ride = CompletedRide.model_validate_json(data)
        except ValidationError:
            return False
        now = self._clock()
        with self._lock:
            kept = self._rides.get(ride.ride_id)
            if kept is not None and kept.actual is None:
                kept.actual = ride.actual_minutes
            elif kept is None and ride.ride_id not in self._early_outcomes:
                self._early_outcomes[ride.ride_id] = (now, ride.actual_minutes)
            else:
                self.repeated_outcomes += 1
            self._evict(now)
        return True

    def record(self, data: bytes, dead_letter: bool = False, at: float | None = None, message_id: str = "") -> bool:
        """One answer (or dead letter); ``at``: when it was published (Pub/Sub's publish time), else now.
        False: not an answer (or a dead letter) this controller can read; skipped."""
        seen = self._clock()
        at = seen if at is None else at
        if dead_letter:
            try:
                version = DeadLetter.model_validate_json(data).model_version
            except ValidationError:
                return False  # not ours to judge (Pub/Sub's own forward of a raw ride is counted by the function's letter)
            with self._lock:
                self._dead.setdefault(message_id or uuid.uuid4().hex, (at, version))
                self._evict(seen)
            return True
        try:
            body = PublishedAnswer.model_validate_json(data)
        except ValidationError:
            return False
        version = sys.intern(body.model_version or "")  # one string per version, not one per answer
        with self._lock:
            kept = self._rides.get(body.ride_id)
            if kept is None:
                kept = self._rides[body.ride_id] = _Kept(seen, at)
                self._order.append(body.ride_id)
                early = self._early_outcomes.pop(body.ride_id, None)
                kept.actual = early[1] if early else None
            if version not in kept.answers[::2]:  # a repeated result keeps the first
                kept.answers += (version, Answer(body.duration_final, body.clipped, body.answer_ms, at))
            self._evict(seen)
        return True

    def window(self, baseline: str, candidate: str, since: float, grace_seconds: float) -> tuple[list, list, int, int, list]:
        """Rides the baseline answered since ``since``, old enough that the candidate had ``grace_seconds``
        to answer too: (baseline answers, candidate answers or None, candidate's and baseline's dead letters,
        actual durations or None where no outcome has come back).

        Only rides answered after this reader started count: of earlier ones, a controller killed before
        it may have taken one half of the pair with it (acked, never kept), which would read as unanswered."""
        now = self._clock()
        since = max(since, self.started_at)
        baselines, candidates, actual = [], [], []
        with self._lock:
            self._evict(now)
            # Newest first, back to the window's opening: published in the window; seen here long enough
            # ago that the other answer had time to arrive (a backlog read after a restart arrives late,
            # however early it was published).
            for ride_id in reversed(self._order):
                kept = self._rides[ride_id]
                if kept.seen < since - CLOCK_SKEW_SECONDS:
                    break
                if since <= kept.published and kept.seen <= now - grace_seconds:
                    answer = kept.answer(baseline)
                    if answer is not None:
                        baselines.append(answer)
                        candidates.append(kept.answer(candidate))
                        actual.append(kept.actual)
            dead = [version for at, version in self._dead.values() if since <= at <= now - grace_seconds]
        baselines.reverse(), candidates.reverse(), actual.reverse()  # oldest first, as they came
        return baselines, candidates, dead.count(candidate), dead.count(baseline), actual
