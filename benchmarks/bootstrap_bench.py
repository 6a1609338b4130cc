"""The judgement's cost: the paired RMSE bootstrap, the watch loop's figures, and a kept ride's memory.

    python benchmarks/bootstrap_bench.py   # prints JSON: each figure beside its target

The bootstrap (ride_contract.quality.paired_rmse_difference) resamples every paired outcome
``bootstrap_samples`` times; drawn all at once it held rides x resamples x 16 bytes (320 MB at
10k outcomes, 3.2 GB at 100k: the 1 GiB controller ran out of memory mid-bake, issue 33). It now
draws a chunk at a time, so its peak memory stays flat; it runs once per decision
(figures(..., interval=True)), the watch loop's every-0.5-s figures skip it (interval=False).
Peak memory is tracemalloc's (numpy's arrays included), above what was allocated before.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from ride_contract.quality import paired_rmse_difference
from rollout.analysis import KEPT_RIDE_BYTES, Answer, LiveAnswers, figures
from rollout.settings import AnalysisSettings

SETTINGS = AnalysisSettings()
PEAK_TARGET_MB = 64  # the bootstrap's peak, at any number of outcomes: well inside the controller's 1 GiB
DECISION_TARGET_SECONDS = {10_000: 2.0, 100_000: 20.0}  # once per decision, on the controller's one CPU
WATCH_TARGET_SECONDS = 0.25  # figures without the bootstrap, called every 0.5 s of a watch


def _measured(call: Callable[[], Any]) -> tuple[float, float]:
    """(seconds, peak MB above the start) of a call: timed without tracemalloc (it slows every allocation), then traced."""
    started = time.perf_counter()
    call()
    seconds = time.perf_counter() - started
    tracemalloc.start()
    try:
        call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return seconds, peak / 1e6


def _paired(outcomes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(outcomes)
    actual = rng.uniform(2, 60, outcomes)
    return actual + rng.normal(0, 5, outcomes), actual + rng.normal(0, 5.2, outcomes), actual


def bootstrap(outcomes: int) -> dict[str, Any]:
    candidate, baseline, actual = _paired(outcomes)
    seconds, peak = _measured(lambda: paired_rmse_difference(candidate, baseline, actual, SETTINGS.bootstrap_samples))
    answers = [[Answer(float(m), False, 3.0, 0.0) for m in minutes] for minutes in (baseline, candidate)]
    watch_seconds, _ = _measured(lambda: figures(*answers, actual=actual.tolist(), settings=SETTINGS, interval=False))
    decision_seconds, decision_peak = _measured(lambda: figures(*answers, actual=actual.tolist(), settings=SETTINGS))
    target = DECISION_TARGET_SECONDS[outcomes]
    return {
        "outcomes": outcomes,
        "resamples": SETTINGS.bootstrap_samples,
        "bootstrap_peak_mb": {"value": round(peak, 1), "target": f"<= {PEAK_TARGET_MB}", "met": peak <= PEAK_TARGET_MB},
        "all_at_once_would_hold_mb": round(outcomes * SETTINGS.bootstrap_samples * 16 / 1e6),
        "bootstrap_seconds": round(seconds, 2),
        "decision_figures_seconds": {
            "value": round(decision_seconds, 2),
            "target": f"<= {target}",
            "met": decision_seconds <= target,
        },
        "decision_figures_peak_mb": round(decision_peak, 1),
        "watch_figures_seconds": {
            "value": round(watch_seconds, 3),
            "target": f"<= {WATCH_TARGET_SECONDS}",
            "met": watch_seconds <= WATCH_TARGET_SECONDS,
        },
    }


def kept_rides(rides: int = 100_000) -> dict[str, Any]:
    """What the controller's memory holds per ride kept for its outcome: two answers and the outcome."""
    from ride_contract.outcome import CompletedRide

    ride_fields = {"datetime": "2021-03-04T18:59:00", "PULocationID": 196, "DOLocationID": 28, "trip_distance": 2.5}
    messages = []
    for i in range(rides):
        ride_id = f"{i:032x}"
        answer = {"ride_id": ride_id, "duration_final": 12.34, "answer_ms": 3.1}
        outcome = CompletedRide(
            ride_id=ride_id,
            fingerprint="f",
            ride=ride_fields,
            requested_at=0,
            duration_coarse=10.0,
            actual_minutes=14.0,
            outcome_at=1,
        )
        messages.append(
            (
                json.dumps({**answer, "model_version": "12"}).encode(),
                json.dumps({**answer, "model_version": "13"}).encode(),
                outcome.model_dump_json().encode(),
            )
        )
    answers = LiveAnswers("bench", ["results"], subscriber=object(), settings=SETTINGS)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for first, second, outcome in messages:
            answers.record(first), answers.record(second), answers.record_outcome(outcome)
        per_ride = (tracemalloc.get_traced_memory()[0] - before) / rides
    finally:
        tracemalloc.stop()
    window_seconds, _ = _measured(lambda: answers.window("12", "13", 0.0, 0.0))
    retention = SETTINGS.answer_retention_seconds()
    return {
        "rides": rides,
        "bytes_per_kept_ride": {"value": round(per_ride), "target": f"<= {KEPT_RIDE_BYTES}", "met": per_ride <= KEPT_RIDE_BYTES},
        "max_kept_rides": SETTINGS.max_kept_rides,
        "max_kept_rides_mb": round(SETTINGS.max_kept_rides * KEPT_RIDE_BYTES / 1e6),
        "retention_seconds": retention,
        # Above this rate the count guard evicts rides before their outcome can come back (counted, logged).
        "rides_per_second_kept_whole_retention": round(SETTINGS.max_kept_rides / retention, 1),
        "window_of_all_seconds": {
            "value": round(window_seconds, 3),
            "target": f"<= {WATCH_TARGET_SECONDS}",
            "met": window_seconds <= WATCH_TARGET_SECONDS,
        },
    }


def main() -> None:
    print(json.dumps({"bootstrap": [bootstrap(10_000), bootstrap(100_000)], "kept_rides": kept_rides()}, indent=2))


if __name__ == "__main__":
    main()
