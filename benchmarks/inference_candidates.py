"""Which library should the serving function score with? Each candidate on the same fitted model, side by side.

    make bench-candidates   # a venv of its own with the candidates; prints JSON

The model is the default pipeline fitted on all of January 2021. For each candidate:
  import_s          importing its runtime in a fresh interpreter (median of 3), and whether
                    scikit-learn, SciPy or pandas came with it (the function may import none)
  per_ride_us       scoring one ride (median of 2,000 single-ride calls): the trees on the
                    ride's encoded inputs, or for the serving form everything from the
                    feature row (zone and pair lookups, binning, trees)
  max_abs_diff_min  largest difference from the sklearn pipeline over every March 2021 ride
Candidates: scikit-learn itself (the reference), ONNX Runtime through skl2onnx, treelite's
GTIL, and the project's serving form (numpy).
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("inference_candidates")
CALLS = 2000
HEAVY = ("sklearn", "scipy", "pandas")


def import_cost(module: str) -> dict:
    code = (
        "import sys, time; started = time.perf_counter(); import " + module + "; "
        "print(time.perf_counter() - started, [m for m in " + repr(HEAVY) + " if m in sys.modules])"
    )
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
        runs.append(float(out[0]))
    return {"import_s": round(statistics.median(runs), 3), "brings": json.loads(out[1].replace("'", '"'))}


def per_ride_us(score, rows: np.ndarray) -> float:
    for row in rows[:50]:
        score(row[None, :])
    times = []
    for row in rows[:CALLS]:
        started = time.perf_counter()
        score(row[None, :])
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e6, 1)


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from data import load_trips
    from ride_contract.ride import RIDE_COLUMNS
    from ride_contract.serving_form import ServingForm
    from ride_contract.sklearn_features import ride_features
    from training import serving_form
    from training.models import build_pipeline

    january = load_trips(REPO / "data/green_tripdata_2021-01.parquet")
    march = load_trips(REPO / "data/green_tripdata_2021-03.parquet")
    pipeline = build_pipeline("hgb").fit(january[RIDE_COLUMNS], january["duration"])
    regressor = pipeline[-1]
    expected = pipeline.predict(march[RIDE_COLUMNS])
    encoded = np.asarray(pipeline[:-1].transform(march[RIDE_COLUMNS]), dtype=np.float64)  # the trees' input
    features = ride_features(march[RIDE_COLUMNS]).to_numpy(dtype=np.float64)
    candidates = {}

    def record(name: str, package: str, module: str, score=None, rows=None, predicted=None, note: str = "") -> None:
        entry = {"package": f"{package} {_package(package)}", **import_cost(module)}
        if score is not None:
            entry["per_ride_us"] = per_ride_us(score, rows)
            entry["max_abs_diff_min"] = float(np.max(np.abs(predicted - expected)))
        entry["note"] = note
        candidates[name] = entry
        log.info("%s: %s", name, entry)

    record(
        "scikit-learn HistGradientBoosting (reference)",
        "scikit-learn",
        "sklearn.ensemble",
        regressor.predict,
        encoded,
        regressor.predict(encoded),
        "the pipeline's own regressor on its encoded inputs",
    )

    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import DoubleTensorType

        onnx_model = convert_sklearn(regressor, initial_types=[("X", DoubleTensorType([None, encoded.shape[1]]))])
        import onnxruntime

        session = onnxruntime.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {"X": x})[0].ravel()  # noqa: E731
        record("ONNX Runtime (skl2onnx)", "onnxruntime", "onnxruntime", run, encoded, run(encoded))
    except Exception as exc:  # the finding itself: report why, measure what can be measured
        import inspect

        from skl2onnx.operator_converters import random_forest  # where skl2onnx converts HistGradientBoosting

        root = exc.__cause__ or exc
        reason = f"skl2onnx cannot convert the regressor ({type(root).__name__}: {str(root).splitlines()[0][:120]})"
        if "is_categorical" not in inspect.getsource(random_forest):
            reason += "; its HistGradientBoosting converter has no categorical splits at all"
        record("ONNX Runtime (skl2onnx)", "onnxruntime", "onnxruntime", note=reason)

    try:
        import treelite

        forest = treelite.sklearn.import_model(regressor)
        run = lambda x: treelite.gtil.predict(forest, x).ravel()  # noqa: E731
        record("treelite GTIL", "treelite", "treelite", run, encoded, run(encoded))
    except ImportError as exc:
        record("treelite GTIL", "treelite", "numpy", note=f"not installed: {exc}")

    with tempfile.TemporaryDirectory() as tmp:
        form = ServingForm.load(serving_form.write(pipeline, Path(tmp) / "serving_form.npz"))
    record(
        "serving form: numpy QuickScorer (chosen)",
        "numpy",
        "ride_contract.serving_form",
        form.predict_features,
        features,
        form.predict_features(features),
        "from the feature row: zone and pair lookups, binning, then the trees",
    )
    print(
        json.dumps(
            {"model": "hgb, January 2021, default parameters", "march_rides": len(march), "candidates": candidates}, indent=2
        )
    )


if __name__ == "__main__":
    main()
