"""Real rides through the backend: POST, wait for the accurate duration, measure; and, as the rider app
does, report each ride's actual duration when the ride ends (time-compressed: OutcomeReporter)."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import requests

from data import load_trips
from devstack.stack import OUTCOME_TIME_COMPRESSION
from ride_contract.ride import MAX_TRIP_DISTANCE_MILES

REPO = Path(__file__).resolve().parent.parent
Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


@dataclass
class RideOutcome:
    ride: dict
    actual: float
    ride_id: str | None = None
    duration_coarse: float | None = None
    duration_final: float | None = None
    duration_low: float | None = None  # the final's range, where the model gives one
    duration_high: float | None = None
    model_version: str | None = None
    model_run_id: str | None = None
    latency_seconds: float | None = None  # POST sent -> final duration seen
    answered_at: float | None = None  # time.time() when the final duration was seen
    error: str | None = None
    outcome_token: str | None = None  # POST /predict's: the outcome is taken only with it
    outcome_scheduled: bool = False  # it goes back when the ride ends (OutcomeReporter)
    outcome_reported: bool = False  # the ride's actual duration went back (POST /rides/<id>/outcome)
    outcome_error: str | None = None  # why it did not
    rider: int | None = None  # who booked it (rider_headers): its outcome comes from the same phone


def real_rides(count: int, month: str = "2021-03", seed: int = 0) -> list[tuple[dict, float]]:
    """Rides from a real TLC month as the backend receives them, with their actual minutes."""
    trips = load_trips(REPO / "data" / f"green_tripdata_{month}.parquet")
    # Only rides the backend accepts (TLC files also hold 0-mile and 200,000-mile meter glitches).
    trips = trips[(trips["trip_distance"] > 0) & (trips["trip_distance"] <= MAX_TRIP_DISTANCE_MILES)].sample(
        count, random_state=seed
    )
    return [
        (
            {
                "datetime": row.datetime.strftime("%Y-%m-%d %H:%M:%S"),
                "PULocationID": int(row.PULocationID),
                "DOLocationID": int(row.DOLocationID),
                "trip_distance": float(row.trip_distance),
            },
            float(row.duration),
        )
        for row in trips.itertuples()
    ]


def rider_headers(index: int) -> dict[str, str]:
    """What Cloud Run's front end adds to rider ``index``'s requests: the rider's own address (X-Forwarded-For),
    one per rider from the benchmarking range 198.18.0.0/15. The local stack has no front end and its backends
    trust one hop, as on Cloud Run, so their per-client limits (backend/limits.py) count riders, not this process."""
    index %= 2 * 256 * 256
    return {"X-Forwarded-For": f"198.{18 + index // 65536}.{index // 256 % 256}.{index % 256}"}


_riders_given = 0
_riders_lock = threading.Lock()


def new_riders(count: int) -> int:
    """The first of ``count`` rider indexes no earlier call was given: each stream's riders are new people."""
    global _riders_given
    with _riders_lock:
        first, _riders_given = _riders_given, _riders_given + count
    return first


def retry_after_seconds(response: requests.Response | None, default: float = 0.5) -> float:
    """How long a refused request (429, 503) asks to wait (Retry-After in seconds), or ``default`` (also when
    there was no answer at all)."""
    try:
        return max(default, float(response.headers.get("Retry-After", ""))) if response is not None else default
    except ValueError:
        return default


def run_clients(client: Callable[[requests.Session, Item], Outcome], items: Iterable[Item], concurrency: int) -> list[Outcome]:
    """``client(session, item)`` for every item on ``concurrency`` threads, in order.

    Each thread keeps one HTTP session (keep-alive), as a real client would."""
    local = threading.local()

    def one(item: Item) -> Outcome:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return client(local.session, item)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, items))


class OutcomeReporter:
    """Reports each ride's actual duration when the ride would really end, as the rider app does: its POST
    (the pickup, now) plus its actual TLC duration, time-compressed ``compression`` times (a 12-minute ride
    ends 12 * 60 / compression seconds after its POST), with the ride's outcome token. Never before its
    final was seen, nor before the backend takes it: an answer "too early" (425) is sent again at the time
    it names. From threads of its own, so riders keep coming while earlier rides are under way.

    ``drain()`` waits until every scheduled outcome went back (or failed); ``close()`` drains and stops."""

    def __init__(self, compression: float = OUTCOME_TIME_COMPRESSION, workers: int = 4, give_up_seconds: float = 60):
        if compression <= 0:
            raise ValueError(f"compression must be above 0, got {compression}")
        self.compression = compression
        self._give_up_seconds = give_up_seconds  # past its end, a ride's outcome that still does not go back
        self._due: list[tuple[float, int, RideOutcome, str, float]] = []  # (when, order, ride, backend, give up at)
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._unfinished = 0
        self._stopping = False
        self._workers = [threading.Thread(target=self._work, name=f"outcomes-{i}", daemon=True) for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def ends_at(self, actual_minutes: float, posted_at: float) -> float:
        """When (time.monotonic()) a ride POSTed at ``posted_at`` ends, in the compressed time."""
        return posted_at + actual_minutes * 60 / self.compression

    def schedule(self, outcome: RideOutcome, url: str, posted_at: float) -> None:
        """Report ``outcome`` (its final seen now; POSTed at time.monotonic() ``posted_at``) to ``url`` when it ends."""
        due = max(self.ends_at(outcome.actual, posted_at), time.monotonic())
        outcome.outcome_scheduled = True
        with self._changed:
            self._unfinished += 1
            heapq.heappush(self._due, (due, next(self._order), outcome, url, due + self._give_up_seconds))
            self._changed.notify()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every scheduled outcome went back or failed; False if ``timeout`` ran out first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._unfinished == 0, timeout)

    def close(self) -> None:
        self.drain()
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for worker in self._workers:
            worker.join()

    def __enter__(self) -> OutcomeReporter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _next(self) -> tuple[RideOutcome, str, float] | None:
        """The next outcome due, once it is (None: stopping)."""
        with self._changed:
            while True:
                if self._stopping:
                    return None
                if self._due and self._due[0][0] <= time.monotonic():
                    _, _, outcome, url, give_up_at = heapq.heappop(self._due)
                    return outcome, url, give_up_at
                self._changed.wait(timeout=self._due[0][0] - time.monotonic() if self._due else None)

    def _work(self) -> None:
        session = requests.Session()
        while (job := self._next()) is not None:
            outcome, url, give_up_at = job
            again_at = self._send(session, outcome, url, give_up_at)
            with self._changed:
                if again_at is None:
                    self._unfinished -= 1
                    self._changed.notify_all()
                else:
                    heapq.heappush(self._due, (again_at, next(self._order), outcome, url, give_up_at))
                    self._changed.notify()

    @staticmethod
    def _send(session: requests.Session, outcome: RideOutcome, url: str, give_up_at: float) -> float | None:
        """POST the outcome; when to send it again (too early, or the backend unavailable), or None: done."""
        body = {"duration_minutes": round(outcome.actual, 2), "outcome_token": outcome.outcome_token}
        response = None
        try:
            headers = rider_headers(outcome.rider) if outcome.rider is not None else None
            response = session.post(f"{url}/rides/{outcome.ride_id}/outcome", json=body, headers=headers, timeout=10)
            status, answer = response.status_code, response.json()
        except (requests.RequestException, ValueError) as exc:
            status, answer = 503, {"error": f"{type(exc).__name__}: {exc}"}
        now = time.monotonic()
        if status == 425:  # the backend says when it takes it: then (its clock; the same machine's here)
            return now + max(0.01, float(answer.get("not_before", 0)) - time.time())
        if status in (429, 503) and now < give_up_at:  # a limit, or the store or the stream down: the app retries
            return now + retry_after_seconds(response)
        outcome.outcome_reported = status == 200
        if status != 200:
            outcome.outcome_error = f"outcome: HTTP {status}: {answer.get('error')}"
        return None


def stream(
    backend_urls: list[str],
    rides: list[tuple[dict, float]],
    concurrency: int = 16,
    wait_seconds: float = 10,
    final_timeout: float = 30,
    report_outcomes: bool | OutcomeReporter = False,
) -> list[RideOutcome]:
    """POST every ride (round-robin over replicas; each request sent again as the rider page does) and collect
    its final duration. With ``report_outcomes``, each ride's real TLC duration goes back when the ride ends
    (OutcomeReporter): True reports them at the local stack's time compression and returns once all went back;
    a reporter given schedules them on it and returns at once (its owner drains it: riders keep coming meanwhile)."""
    reporter = OutcomeReporter() if report_outcomes is True else report_outcomes or None

    def one(session: requests.Session, job: tuple[int, dict, float]) -> RideOutcome:
        index, ride, actual = job
        outcome = RideOutcome(ride, actual)
        url = backend_urls[index % len(backend_urls)]
        started = time.perf_counter()
        deadline = started + final_timeout
        outcome.rider = first_rider + index
        headers = rider_headers(outcome.rider)

        # The rider's app names its ride (as the rider page does), so a request it has to send again (no answer in
        # time, a refusal, the stream down) is the same ride, never a second one.
        booking = {**ride, "ride_id": uuid.uuid4().hex}

        def ask(method: str, address: str, json: dict | None = None, wait: float = wait_seconds) -> requests.Response:
            """One request, sent again as the page does (the same request, after Retry-After or half a second)
            while it gets no answer or a 429/503 and the rider still waits; then the last answer (or error)."""
            while True:
                try:
                    response = session.request(
                        method, address, params={"wait": wait}, json=json, headers=headers, timeout=wait + 15
                    )
                except requests.RequestException:
                    if time.perf_counter() >= deadline:
                        raise
                    response = None
                if response is not None and (response.status_code not in (429, 503) or time.perf_counter() >= deadline):
                    return response
                time.sleep(retry_after_seconds(response))

        try:
            response = ask("POST", f"{url}/predict", json=booking)
            # The pickup: the ride's end is counted from its booking's answer, when the backend has surely recorded
            # it (a loaded machine's slow POST never makes an outcome look earlier than its ride's end).
            posted_at = time.monotonic()
            body = response.json()
            if response.status_code >= 400:
                outcome.error = f"HTTP {response.status_code}: {body.get('error')}"
                return outcome
            outcome.ride_id, outcome.duration_coarse = body["ride_id"], body["duration_coarse"]
            outcome.outcome_token = body.get("outcome_token")
            # Not final yet: ask another replica, as a client long-polling GET would.
            other = backend_urls[(index + 1) % len(backend_urls)]
            while body.get("status") != "done" and (left := deadline - time.perf_counter()) > 0:
                body = ask("GET", f"{other}/rides/{outcome.ride_id}", wait=min(wait_seconds, max(1, int(left)))).json()
            if body.get("status") == "done":
                outcome.latency_seconds = time.perf_counter() - started
                outcome.answered_at = time.time()
                outcome.duration_final = body["duration_final"]
                outcome.duration_low, outcome.duration_high = body.get("duration_low"), body.get("duration_high")
                outcome.model_version = body.get("model_version")
                outcome.model_run_id = body.get("model_run_id")
                if reporter is not None:  # to another replica than the POST's, as a phone's next request may be
                    reporter.schedule(outcome, other, posted_at)
            else:
                outcome.error = f"no final duration within {final_timeout:g} s"
        except (requests.RequestException, ValueError, KeyError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome

    first_rider = new_riders(len(rides))
    outcomes = run_clients(one, [(i, ride, actual) for i, (ride, actual) in enumerate(rides)], concurrency)
    if report_outcomes is True:
        reporter.close()
    return outcomes


def summarize(outcomes: list[RideOutcome], elapsed_seconds: float | None = None) -> dict:
    answered = [o for o in outcomes if o.duration_final is not None]
    summary = {"rides": len(outcomes), "answered": len(answered), "lost": len(outcomes) - len(answered)}
    if answered:
        actual = np.array([o.actual for o in answered])
        latencies = np.array([o.latency_seconds for o in answered]) * 1000
        summary |= {
            "rmse_coarse": round(float(np.sqrt(np.mean((np.array([o.duration_coarse for o in answered]) - actual) ** 2))), 3),
            "rmse_final": round(float(np.sqrt(np.mean((np.array([o.duration_final for o in answered]) - actual) ** 2))), 3),
            "latency_ms_p50": round(float(np.percentile(latencies, 50)), 1),
            "latency_ms_p95": round(float(np.percentile(latencies, 95)), 1),
            "latency_ms_p99": round(float(np.percentile(latencies, 99)), 1),
            "model_versions": sorted({str(o.model_version) for o in answered}),
        }
        ranged = [o for o in answered if o.duration_low is not None]
        if ranged:
            summary["within_range"] = round(sum(o.duration_low <= o.actual <= o.duration_high for o in ranged) / len(ranged), 3)
    if any(o.outcome_reported for o in outcomes):
        summary["outcomes_reported"] = sum(o.outcome_reported for o in outcomes)
    under_way = sum(1 for o in outcomes if o.outcome_scheduled and not o.outcome_reported and not o.outcome_error)
    if under_way:
        summary["rides_under_way"] = under_way  # their outcomes go back when they end
    if elapsed_seconds:
        summary["rides_per_second"] = round(len(answered) / elapsed_seconds, 1)
    errors = sorted({error for o in outcomes for error in (o.error, o.outcome_error) if error})
    if errors:
        summary["errors"] = errors[:5]
    return summary
