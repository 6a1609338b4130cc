"""Pre-flight: a version must load through the serving function's own loader and answer its reference rides.

    python -m rollout.preflight MODEL_URI [RUN_ID]     # one JSON line: passed, reason, figures

Training logs, inside the model folder, real test rides with what the fitted pipeline
answered for them as served (``extra_files/reference_rides.json``). Before a version is
rolled out, it is loaded exactly as a cold start loads it (``serving_function.model_store``:
the MLmodel file, the model's own ride contract, its serving form; nothing unpickled), scores
those rides with the model's own scorer and bounds, and must answer every one within
``TOLERANCE_MINUTES``; a version with a range must give each ride the range training recorded,
as closely. What the model really answers, before the contract clips it into its duration
bounds, must be a number (no NaN, no infinity) within those bounds for all but
``MAX_RAW_OUT_OF_BOUNDS_SHARE`` of the rides: the answers as served are clipped, so a model
answering 500 minutes for every ride would answer them "as recorded" (60 min). It runs in a
process of its own, as a cold start does: the model's ride contract is imported fresh for each version.

A check that could not be *evaluated* (the model store unreachable, a storage error, the
process timed out or was killed) says ``evaluated=False``: retry later, the version is not at
fault. A version that is absent, malformed or answers wrongly is evaluated and fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TOLERANCE_MINUTES = 0.01
# A healthy model may answer a few real rides just outside the bounds (a 62-minute guess for a long
# ride, served as 60); beyond this share of its reference rides, it answers another scale.
MAX_RAW_OUT_OF_BOUNDS_SHARE = 0.02
PREFLIGHT_TIMEOUT_SECONDS = 180
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Preflight:
    passed: bool
    reason: str
    rides: int = 0
    max_diff_minutes: float | None = None
    out_of_bounds: int = 0  # raw answers (before clipping) outside the contract's bounds, or not a number
    seconds: float = 0.0
    # False: the check could not be carried out (storage unreachable, a timeout): retry, do not block.
    evaluated: bool = True


def check(model_uri: str, run_id: str = "") -> Preflight:
    """Load and score in this process (``run`` calls it in a process of its own)."""
    from serving_function.model_store import ModelNotFound, ModelStoreUnavailable, load_model, read_model_file

    started = time.monotonic()
    try:
        loaded = load_model(model_uri)
        if run_id and loaded.run_id != run_id:
            return Preflight(False, f"the model at {model_uri} was logged by run {loaded.run_id}, not {run_id}")
        name = getattr(loaded.contract.serving_form, "REFERENCE_FILE", None)
        if name is None:
            return Preflight(False, "the model ships no reference rides: it was logged before pre-flight existed; retrain")
        reference = json.loads(read_model_file(model_uri, f"extra_files/{name}"))
    except ModelStoreUnavailable as exc:  # the store, not the version: try again later
        reason = f"could not read the model to check it: {exc}"
        return Preflight(False, reason, seconds=round(time.monotonic() - started, 2), evaluated=False)
    except (ModelNotFound, ValueError) as exc:
        return Preflight(False, f"does not load as the function loads it: {exc}", seconds=round(time.monotonic() - started, 2))
    contract = loaded.contract
    if not reference["rides"]:
        return Preflight(False, "the model's reference rides are empty", seconds=round(time.monotonic() - started, 2))
    try:
        rides = [contract.ride.parse_ride(ride) for ride in reference["rides"]]
        predicted = np.asarray(loaded.model.predict(rides), dtype=np.float64)
        served = contract.result.served_minutes(predicted).tolist()
        answered, recorded = [served], [reference["served_minutes"]]
        if loaded.interval is not None:
            answered += [bound.tolist() for bound in contract.result.served_range(predicted, *loaded.interval.predict(rides))]
            recorded += [reference["served_low"], reference["served_high"]]
        if [len(ours) for ours in answered] != [len(theirs) for theirs in recorded]:
            raise ValueError("the reference rides and what training recorded for them differ in number")
        # np.max, not max(): a NaN anywhere makes the distance NaN instead of being skipped by a comparison.
        diff = float(np.max(np.abs(np.concatenate(answered) - np.concatenate(recorded, dtype=np.float64))))
    except Exception as exc:  # the version's own contract or scorer fails on real rides (or its references lack the range)
        reason = f"cannot answer its reference rides: {type(exc).__name__}: {exc}"
        return Preflight(False, reason, seconds=round(time.monotonic() - started, 2))
    low, high = contract.ride.MIN_DURATION_MINUTES, contract.ride.MAX_DURATION_MINUTES
    # The raw answers, not the served ones (those are clipped into the bounds, so they always fit).
    # NaN compares False both ways: counted out of bounds.
    out_of_bounds = int(np.count_nonzero(~((predicted >= low) & (predicted <= high))))
    not_numbers = int(np.count_nonzero(~np.isfinite(predicted)))
    seconds = round(time.monotonic() - started, 2)
    diff = round(diff, 6) if np.isfinite(diff) else None  # JSON has no NaN
    answers_wrongly = diff is None or diff > TOLERANCE_MINUTES
    if answers_wrongly or not_numbers or out_of_bounds > MAX_RAW_OUT_OF_BOUNDS_SHARE * len(rides):
        away = f"{diff:.3f} min" if diff is not None else "an unknown distance (not a number)"
        reason = (
            f"answers its {len(rides)} reference rides up to {away} away from what training recorded "
            f"(tolerance {TOLERANCE_MINUTES} min); before clipping, {out_of_bounds} answers outside {low:g}-{high:g} min "
            f"(at most {MAX_RAW_OUT_OF_BOUNDS_SHARE:.0%} may be), {not_numbers} not a number"
        )
        if not answers_wrongly and out_of_bounds:
            finite = predicted[np.isfinite(predicted)]
            span = f"{finite.min():.1f} to {finite.max():.1f} min" if finite.size else "none a number"
            reason += f"; it answers {span} before clipping"
        return Preflight(False, reason, len(rides), diff, out_of_bounds, seconds)
    reason = f"answers its {len(rides)} reference rides as recorded"
    if out_of_bounds:
        reason += f" ({out_of_bounds} just outside {low:g}-{high:g} min before clipping)"
    return Preflight(True, reason, len(rides), diff, out_of_bounds, seconds)


def run(model_uri: str, run_id: str = "") -> Preflight:
    """``check`` in a process of its own, as a cold start would load the version."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "rollout.preflight", model_uri, run_id],
            capture_output=True,
            text=True,
            timeout=PREFLIGHT_TIMEOUT_SECONDS,
            cwd=REPO,
            check=False,
        )
    except subprocess.TimeoutExpired:  # a slow store or a busy machine as much as the version: try again
        return Preflight(False, f"did not load and answer within {PREFLIGHT_TIMEOUT_SECONDS} s", evaluated=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        seconds = round(time.monotonic() - started, 2)
        if done.returncode < 0:  # killed by a signal (out of memory, the instance stopping): not the version's doing
            return Preflight(
                False, f"pre-flight was killed (signal {-done.returncode}): {last[:500]}", seconds=seconds, evaluated=False
            )
        return Preflight(False, f"pre-flight crashed: {last[:500]}", seconds=seconds)
    return Preflight(**json.loads(lines[-1]))


def main() -> int:
    print(json.dumps(asdict(check(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
