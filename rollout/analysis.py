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

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

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
) -> dict[str, Any]:
    """The analysis figures of rides answered by the baseline; ``candidate[i]`` is None where the candidate
    gave no answer for ride i. ``actual[i]``: the ride's actual duration where it has come back."""
    settings = settings or AnalysisSettings()
    rides = len(baseline)
    paired = [(b, c) for b, c in zip(baseline, candidate, strict=True) if c is not None]
    out: dict[str, Any] = {"rides": rides, "paired": len(paired)}
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
    if actual is not None:
        known = [(b_, c_, a) for b_, c_, a in zip(baseline, candidate, actual, strict=True) if c_ is not None and a is not None]
        if len(known) >= settings.min_outcomes:
            low, mid, high = paired_rmse_difference(
                np.array([c_.duration for _, c_, _ in known]),
                np.array([b_.duration for b_, _, _ in known]),
                np.array([a for _, _, a in known]),
                settings.bootstrap_samples,
            )
            out["outcomes"] = len(known)
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


class LiveAnswers:
    """The answers of every deployment, by ride and version, read from the controller's own subscriptions.

    Results arrive from production's result topic and the shadow's; dead letters from the dead-letter
    topic (each carries the version that refused the ride). Unary pulls, acked at once: what the
    controller reads is a copy (its subscriptions), never what the backends or the function consume."""

    def __init__(
        self, project: str, result_subscriptions: list[str], deadletter_subscription: str = "", outcome_subscription: str = ""
    ):
        self.project = project
        self.subscriptions = [s for s in result_subscriptions if s]
        self.deadletter_subscription = deadletter_subscription
        self.outcome_subscription = outcome_subscription  # completed rides: the actual durations, where they come back
        self._actual: OrderedDict[str, float] = OrderedDict()  # ride_id -> actual minutes
        self._answers: OrderedDict[str, dict[str, Answer]] = OrderedDict()  # ride_id -> version -> answer
        self._first_seen: dict[str, float] = {}  # ride_id -> when its first answer reached this reader
        self._first_published: dict[str, float] = {}  # ride_id -> when its first answer was published
        self._dead: list[tuple[float, str]] = []  # (at, model_version)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started_at = time.time()

    def start(self) -> LiveAnswers:
        self.started_at = time.time()
        for name in [*self.subscriptions, self.deadletter_subscription, self.outcome_subscription]:
            if name:
                thread = threading.Thread(target=self._pull, args=(name,), name=f"answers-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()

    def _pull(self, name: str) -> None:
        from google.api_core import exceptions
        from google.cloud import pubsub_v1

        subscriber = pubsub_v1.SubscriberClient()
        path = subscriber.subscription_path(self.project, name)
        while not self._stop.is_set():
            try:
                response = subscriber.pull(subscription=path, max_messages=500, timeout=2)
            except exceptions.DeadlineExceeded:
                continue
            except Exception as exc:  # the stream is down: the figures stop growing, the window waits
                log.warning("analysis: pulling %s: %s: %s", name, type(exc).__name__, exc)
                self._stop.wait(1)
                continue
            if not response.received_messages:
                continue
            subscriber.acknowledge(subscription=path, ack_ids=[m.ack_id for m in response.received_messages])
            for received in response.received_messages:
                published = received.message.publish_time
                at = published.timestamp() if published else None
                if name == self.outcome_subscription:
                    self.record_outcome(received.message.data)
                else:
                    self.record(received.message.data, dead_letter=name == self.deadletter_subscription, at=at)

    def record_outcome(self, data: bytes) -> None:
        """A completed ride (the outcomes topic): its actual duration, for the paired RMSE difference."""
        try:
            ride = CompletedRide.model_validate_json(data)
        except ValidationError:
            return
        with self._lock:
            self._actual[ride.ride_id] = ride.actual_minutes
            while len(self._actual) > KEPT_RIDES:
                self._actual.popitem(last=False)

    def record(self, data: bytes, dead_letter: bool = False, at: float | None = None) -> None:
        """One answer (or dead letter); ``at``: when it was published (Pub/Sub's publish time), else now."""
        seen = time.time()
        at = seen if at is None else at
        try:
            body = json.loads(data)
        except ValueError:
            return  # not ours to judge (Pub/Sub's own forward of a raw ride is counted by the function's letter)
        if dead_letter:
            if isinstance(body, dict) and body.get("model_version") is not None:
                with self._lock:
                    self._dead.append((at, str(body["model_version"])))
            return
        if not isinstance(body, dict) or not body.get("ride_id") or body.get("duration_final") is None:
            return
        answer = Answer(float(body["duration_final"]), bool(body.get("clipped")), body.get("answer_ms"), at)
        with self._lock:
            ride = self._answers.setdefault(body["ride_id"], {})
            ride.setdefault(str(body.get("model_version", "")), answer)  # a repeated result keeps the first
            self._first_seen.setdefault(body["ride_id"], seen)
            self._first_published.setdefault(body["ride_id"], at)
            while len(self._answers) > KEPT_RIDES:
                old, _ = self._answers.popitem(last=False)
                self._first_seen.pop(old, None)
                self._first_published.pop(old, None)

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
            dead = [version for at, version in self._dead if since <= at <= now - grace_seconds]
            actual = [self._actual.get(ride_id) for ride_id, _ in rides]
        return (
            [answers[baseline] for _, answers in rides],
            [answers.get(candidate) for _, answers in rides],
            dead.count(candidate),
            dead.count(baseline),
            actual,
        )
