"""Live quality: every answer a ride got, judged on its actual duration once the app reports it.

Per answering model: the coarse estimate, the final (``final v<N>``, what riders got) and each
shadow version (``shadow v<N>``, answers riders never saw), on the same completed rides.

The backend's store adds each completed ride's errors (answer - actual, in minutes) to sums in a
bucket per QUALITY_BUCKET_SECONDS, shared by every replica; the figures over a window are those sums
added up: count, bias (mean error), MAE and RMSE, exactly as over the rides themselves; for a
final that came with a range, its coverage (the share of rides that ended within it) and mean
width. The monitoring flow computes the same figures from the completed rides the outcomes topic filed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ride_contract.outcome import CompletedRide

QUALITY_BUCKET_SECONDS = 60
# Per model: rides, sum of errors, of absolute errors, of squared errors; rides with a range, how
# many ended within it, and the ranges' summed widths.
SUMS = ("n", "err", "abs", "sq", "ranged", "inside", "width")


def answers_of(ride: CompletedRide) -> dict[str, float]:
    """Each answer the ride got, by who gave it: coarse, final v<N> (if it got its final), shadow v<N>."""
    answers = {"coarse": ride.duration_coarse}
    if ride.duration_final is not None:
        answers[f"final v{ride.model_version or '?'}"] = ride.duration_final
    for shadow in ride.shadow:
        answers[f"shadow v{shadow.model_version}"] = shadow.duration_final
    return answers


def sums_of(ride: CompletedRide) -> dict[str, float]:
    """The increments one completed ride adds: ``<model>|n``, ``|err``, ``|abs``, ``|sq``."""
    sums: dict[str, float] = {}
    for model, answer in answers_of(ride).items():
        error = answer - ride.actual_minutes
        sums.update({f"{model}|n": 1.0, f"{model}|err": error, f"{model}|abs": abs(error), f"{model}|sq": error * error})
    if ride.duration_final is not None and ride.duration_low is not None and ride.duration_high is not None:
        final = f"final v{ride.model_version or '?'}"
        inside = ride.duration_low <= ride.actual_minutes <= ride.duration_high
        width = ride.duration_high - ride.duration_low
        sums.update({f"{final}|ranged": 1.0, f"{final}|inside": float(inside), f"{final}|width": width})
    return sums


def add_ride(bucket: dict[str, float], ride: CompletedRide) -> None:
    """Add one completed ride's increments to a bucket's sums."""
    for field, value in sums_of(ride).items():
        bucket[field] = bucket.get(field, 0.0) + value


def bucket_of(at: float) -> int:
    return int(at // QUALITY_BUCKET_SECONDS)


def window_buckets(now: float, window_seconds: float) -> range:
    """The buckets of the last ``window_seconds`` (whole buckets: the window ends with the current one)."""
    last = bucket_of(now)
    return range(last - max(1, math.ceil(window_seconds / QUALITY_BUCKET_SECONDS)) + 1, last + 1)


def figures(buckets: Iterable[Mapping[str, float]], window_seconds: float) -> dict[str, Any]:
    """Count, bias, MAE and RMSE per model over the buckets' sums (minutes; bias > 0: answers too long), and
    where its answers had a range, ``coverage`` (share of those rides ending within it) and ``mean_width``."""
    totals: dict[str, dict[str, float]] = {}
    for bucket in buckets:
        for field, value in bucket.items():
            model, _, kind = field.rpartition("|")
            totals.setdefault(model, dict.fromkeys(SUMS, 0.0))[kind] += float(value)
    models = {
        model: {
            "rides": round(t["n"]),
            "rmse": round(math.sqrt(max(t["sq"], 0.0) / t["n"]), 3),
            "mae": round(t["abs"] / t["n"], 3),
            "bias": round(t["err"] / t["n"], 3),
            **(
                {
                    "ranged": round(t["ranged"]),
                    "coverage": round(t["inside"] / t["ranged"], 3),
                    "mean_width": round(t["width"] / t["ranged"], 2),
                }
                if t["ranged"] >= 1
                else {}
            ),
        }
        for model, t in sorted(totals.items())
        if t["n"] >= 1
    }
    return {"window_seconds": window_seconds, "models": models}


# Resampled rides per chunk of the bootstrap: its indices and one gathered copy of the errors, 16 bytes a ride,
# so about 16 MB at a time however many rides and resamples (all at once, 10k rides took 320 MB, issue 33).
BOOTSTRAP_CHUNK_ELEMENTS = 1 << 20


def paired_rmse_difference(
    candidate: np.ndarray, baseline: np.ndarray, actual: np.ndarray, samples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """RMSE(candidate) - RMSE(baseline) on the same rides, with a 95 % bootstrap interval: (low, estimate, high).

    Rides are resampled as pairs, so the ride-to-ride variation both models share cancels out. The guarded
    rollout judges a version in shadow with it, the champion-against-challenger flow a challenger.
    The resamples are drawn a chunk at a time from one generator: the same draws, in the same order, as
    drawing them all at once, in memory bounded by ``BOOTSTRAP_CHUNK_ELEMENTS`` (see benchmarks/bootstrap_bench.py)."""
    candidate, baseline, actual = (np.asarray(a, dtype=np.float64) for a in (candidate, baseline, actual))
    rides = len(actual)
    if not rides:
        raise ValueError("no rides to compare")
    rng = np.random.default_rng(seed)
    errors_c, errors_b = (candidate - actual) ** 2, (baseline - actual) ** 2
    estimate = float(np.sqrt(errors_c.mean()) - np.sqrt(errors_b.mean()))
    per_chunk = max(1, BOOTSTRAP_CHUNK_ELEMENTS // rides)
    diffs = np.empty(samples)
    for start in range(0, samples, per_chunk):
        count = min(per_chunk, samples - start)
        index = rng.integers(0, rides, size=(count, rides))
        # One gathered copy at a time (each is freed once averaged).
        diffs[start : start + count] = np.sqrt(errors_c[index].mean(axis=1)) - np.sqrt(errors_b[index].mean(axis=1))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), estimate, float(high)


def paired_verdict(low: float, estimate: float, high: float, rides: int, candidate: str, baseline: str) -> str:
    """What the interval allows one to say, and no more: a side only when it excludes zero."""
    span = f"RMSE {candidate} - {baseline} {estimate:+.3f} min (95 % CI {low:+.3f} to {high:+.3f}) on {rides} rides"
    if high < 0:
        return f"{candidate} better: {span}"
    if low > 0:
        return f"{candidate} worse: {span}"
    return f"not yet distinguishable: {span}"
