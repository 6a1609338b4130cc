"""Training cost: the full logged training run vs a bare fit of the same pipeline, on January 2021.

    python benchmarks/train_bench.py   # prints JSON

The difference is what MLflow logging, plots, the baseline, the range and registration add.
Beside it, the rider's range: the two quantile models' fit and calibration, and the coverage and
median width the run measured on the test month (target: 78-82 %, nominal 80 %).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from data import load_trips, month_uri
from training import interval
from training.settings import Settings
from training.train import TARGET, TrainConfig, fit, score, train


def main() -> None:
    settings = Settings.from_env()
    train_frame = load_trips(month_uri("2021-01", settings.data_base))
    val_frame = load_trips(month_uri("2021-02", settings.data_base))
    test_frame = load_trips(month_uri("2021-03", settings.data_base))

    start = time.perf_counter()
    model = fit("hgb", {}, train_frame)
    bare_fit = time.perf_counter() - start
    start = time.perf_counter()
    interval.fit(train_frame, val_frame, TARGET)
    range_fit = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        run_settings = Settings(
            tracking_uri=f"sqlite:///{tmp}/mlflow.db",
            experiment_name="bench",
            artifact_root=f"{tmp}/artifacts",
            model_name="bench",
            data_base=settings.data_base,
        )
        start = time.perf_counter()
        result = train(TrainConfig(trials=1), run_settings)
        full_run = time.perf_counter() - start

    print(
        json.dumps(
            {
                "train_rows": len(train_frame),
                "bare_fit_seconds": round(bare_fit, 2),
                "range_fit_and_calibration_seconds": round(range_fit, 2),
                "fit_with_range_seconds": {
                    "value": round(bare_fit + range_fit, 2),
                    "target": "< 30",
                    "met": bare_fit + range_fit < 30,
                },
                "full_training_run_seconds": round(full_run, 2),
                "overhead_ratio": round(full_run / bare_fit, 2),
                "bare_fit_val_rmse": round(score(model, val_frame)["rmse"], 3),
                "bare_fit_test_rmse": round(score(model, test_frame)["rmse"], 3),
                "run_val_rmse": round(result.metrics["val_rmse"], 3),
                "run_test_rmse": round(result.metrics["test_rmse"], 3),
                "baseline_val_rmse": round(result.metrics["baseline_val_rmse"], 3),
                "coarse_val_rmse": round(result.metrics["coarse_val_rmse"], 3),
                "run_rmse_target": {
                    "target": "<= 5.4 on val and test",
                    "met": max(result.metrics["val_rmse"], result.metrics["test_rmse"]) <= 5.4,
                },
                "test_interval_coverage": {
                    "value": round(result.metrics["test_interval_coverage"], 4),
                    "target": "0.78-0.82",
                    "met": 0.78 <= result.metrics["test_interval_coverage"] <= 0.82,
                },
                "test_interval_raw_coverage": round(result.metrics["test_interval_raw_coverage"], 4),
                "test_interval_median_width_minutes": round(result.metrics["test_interval_median_width"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
