"""Pre-flight: a version must load through the serving function's own loader and answer its reference rides.

    python -m rollout.preflight MODEL_URI [RUN_ID]     # one JSON line: passed, reason, figures

Training logs, inside the model folder, real test rides with what the fitted pipeline
answered for them as served (``extra_files/reference_rides.json``). Before a version is
rolled out, it is loaded exactly as a cold start loads it (``serving_function.model_store``:
the MLmodel file, the model's own ride contract, its serving form; nothing unpickled), scores
those rides with the model's own scorer and bounds, and must answer every one within
``TOLERANCE_MINUTES`` and within the contract's duration bounds; a version with a range must
give each ride the range training recorded, as closely. It runs in a process of its
own, as a cold start does: the model's ride contract is imported fresh for each version.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TOLERANCE_MINUTES = 0.01
PREFLIGHT_TIMEOUT_SECONDS = 180
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Preflight:
    passed: bool
    reason: str
    rides: int = 0
    max_diff_minutes: float | None = None
    out_of_bounds: int = 0
    seconds: float = 0.0


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
    except (ModelNotFound, ModelStoreUnavailable, ValueError) as exc:
        return Preflight(False, f"does not load as the function loads it: {exc}", seconds=round(time.monotonic() - started, 2))
    contract = loaded.contract
    if not reference["rides"]:
        return Preflight(False, "the model's reference rides are empty", seconds=round(time.monotonic() - started, 2))
    try:
        rides = [contract.ride.parse_ride(ride) for ride in reference["rides"]]
        predicted = loaded.model.predict(rides)
        served = contract.result.served_minutes(predicted).tolist()
        answered, recorded = [served], [reference["served_minutes"]]
        if loaded.interval is not None:
            answered += [bound.tolist() for bound in contract.result.served_range(predicted, *loaded.interval.predict(rides))]
            recorded += [reference["served_low"], reference["served_high"]]
    except Exception as exc:  # the version's own contract or scorer fails on real rides (or its references lack the range)
        reason = f"cannot answer its reference rides: {type(exc).__name__}: {exc}"
        return Preflight(False, reason, seconds=round(time.monotonic() - started, 2))
    diff = float(
        max(abs(a - b) for ours, theirs in zip(answered, recorded, strict=True) for a, b in zip(ours, theirs, strict=True))
    )
    low, high = contract.ride.MIN_DURATION_MINUTES, contract.ride.MAX_DURATION_MINUTES
    out_of_bounds = sum(not low <= minutes <= high for minutes in served)
    seconds = round(time.monotonic() - started, 2)
    if diff > TOLERANCE_MINUTES or out_of_bounds:
        reason = (
            f"answers its {len(rides)} reference rides up to {diff:.3f} min away from what training recorded "
            f"(tolerance {TOLERANCE_MINUTES} min), {out_of_bounds} outside {low:g}-{high:g} min"
        )
        return Preflight(False, reason, len(rides), round(diff, 6), out_of_bounds, seconds)
    return Preflight(True, f"answers its {len(rides)} reference rides as recorded", len(rides), round(diff, 6), 0, seconds)


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
    except subprocess.TimeoutExpired:
        return Preflight(False, f"did not load and answer within {PREFLIGHT_TIMEOUT_SECONDS} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Preflight(False, f"pre-flight crashed: {last[:500]}", seconds=round(time.monotonic() - started, 2))
    return Preflight(**json.loads(lines[-1]))


def main() -> int:
    print(json.dumps(asdict(check(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
