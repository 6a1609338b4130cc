"""Real rides through the backend: POST, wait for the accurate duration, measure."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import requests

from data import load_trips
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
    outcome_reported: bool = False  # the ride's actual duration went back (POST /rides/<id>/outcome)


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


def stream(
    backend_urls: list[str],
    rides: list[tuple[dict, float]],
    concurrency: int = 16,
    wait_seconds: float = 10,
    final_timeout: float = 30,
    report_outcomes: bool = False,
) -> list[RideOutcome]:
    """POST every ride (round-robin over replicas, retrying 503s) and collect its final duration; with
    ``report_outcomes``, then report the ride's real TLC duration as the rider app does when the ride ends."""

    def one(session: requests.Session, job: tuple[int, dict, float]) -> RideOutcome:
        index, ride, actual = job
        outcome = RideOutcome(ride, actual)
        url = backend_urls[index % len(backend_urls)]
        started = time.perf_counter()
        deadline = started + final_timeout
        try:
            response = session.post(f"{url}/predict", params={"wait": wait_seconds}, json=ride, timeout=wait_seconds + 10)
            # 503: the stream is down and the ride was not taken; a client retries it.
            while response.status_code == 503 and time.perf_counter() < deadline:
                time.sleep(0.5)
                response = session.post(f"{url}/predict", params={"wait": wait_seconds}, json=ride, timeout=wait_seconds + 10)
            body = response.json()
            if response.status_code >= 400:
                outcome.error = f"HTTP {response.status_code}: {body.get('error')}"
                return outcome
            outcome.ride_id, outcome.duration_coarse = body["ride_id"], body["duration_coarse"]
            # Not final yet: ask another replica, as a client polling GET would.
            other = backend_urls[(index + 1) % len(backend_urls)]
            while body.get("status") != "done" and time.perf_counter() < deadline:
                time.sleep(0.05)
                body = session.get(f"{other}/rides/{outcome.ride_id}", timeout=10).json()
            if body.get("status") == "done":
                outcome.latency_seconds = time.perf_counter() - started
                outcome.answered_at = time.time()
                outcome.duration_final = body["duration_final"]
                outcome.duration_low, outcome.duration_high = body.get("duration_low"), body.get("duration_high")
                outcome.model_version = body.get("model_version")
                outcome.model_run_id = body.get("model_run_id")
                if report_outcomes:
                    outcome.outcome_reported = _report_outcome(session, other, outcome.ride_id, actual, deadline)
            else:
                outcome.error = f"no final duration within {final_timeout:g} s"
        except (requests.RequestException, ValueError, KeyError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome

    return run_clients(one, [(i, ride, actual) for i, (ride, actual) in enumerate(rides)], concurrency)


def _report_outcome(session: requests.Session, url: str, ride_id: str, actual: float, deadline: float) -> bool:
    """POST the actual minutes, retrying 503s (the store or the outcomes stream is down) until ``deadline``."""
    while True:
        response = session.post(f"{url}/rides/{ride_id}/outcome", json={"duration_minutes": round(actual, 2)}, timeout=10)
        if response.status_code != 503 or time.perf_counter() >= deadline:
            return response.status_code == 200
        time.sleep(0.5)


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
    if elapsed_seconds:
        summary["rides_per_second"] = round(len(answered) / elapsed_seconds, 1)
    errors = sorted({o.error for o in outcomes if o.error})
    if errors:
        summary["errors"] = errors[:5]
    return summary
