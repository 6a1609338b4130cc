"""The ride's range: 10th and 90th percentile models, calibrated on the validation month.

Quantile models alone under-cover: fitted on January 2021, HistGradientBoosting's p10 and p90 hold
only 71-73 % of February's and March's rides, because they are fitted to the rides they then
describe. Conformalized quantile regression (Romano, Patterson and Candes, NeurIPS 2019)
corrects that on rides the models never saw: each validation ride's conformity score is how far
its actual duration lies outside [p10, p90] (negative inside), and the margin is the score's
ceil((n + 1) * 0.8) / n empirical quantile. [p10 - margin, p90 + margin] then holds a new ride with
probability at least 80 % when rides are exchangeable; months are not quite, so training reports
the coverage it reaches on the test month, and the live figures report it on real outcomes.

The three models travel together: the range's serving forms and ``interval.json`` go into the
model folder beside the point model's (``ride_contract.serving_form.Interval``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from ride_contract.result import served_range
from ride_contract.ride import RIDE_COLUMNS
from ride_contract.serving_form import HIGH_FORM_FILE, INTERVAL_FILE, INTERVAL_FORMAT, LOW_FORM_FILE, Interval, ServingForm
from training import serving_form
from training.models import DEFAULT_PARAMS, build_pipeline

NOMINAL_COVERAGE = 0.8
QUANTILES = (0.1, 0.9)  # (1 - NOMINAL_COVERAGE) / 2 on either side
# The default pipeline's, with a faster rate and half the leaves: quantile fits cost more per iteration
# (the leaves' values are recomputed as quantiles), and on Jan -> Feb -> Mar 2021 these fit in 4 s
# instead of 9 s to the same coverage and width (81.6 % within a median 9.0 min, against 81.7 % and 9.1).
QUANTILE_PARAMS = {**DEFAULT_PARAMS["hgb"], "learning_rate": 0.1, "max_leaf_nodes": 31, "loss": "quantile"}


@dataclass
class FittedInterval:
    low: Pipeline
    high: Pipeline
    margin_minutes: float
    calibration_rides: int

    def bounds(self, rides: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Raw (low, high) minutes for a frame with the ride columns, the margin applied."""
        rides = rides[RIDE_COLUMNS]
        return self.low.predict(rides) - self.margin_minutes, self.high.predict(rides) + self.margin_minutes


def quantile_pipeline(quantile: float) -> Pipeline:
    """The default pipeline fitted to a quantile (pinball loss) instead of the mean: the same features and encoders."""
    return build_pipeline("hgb", {**QUANTILE_PARAMS, "quantile": quantile})


def conformal_margin(low: np.ndarray, high: np.ndarray, actual: np.ndarray, coverage: float = NOMINAL_COVERAGE) -> float:
    """The CQR margin: the ceil((n + 1) * coverage)-th smallest conformity score max(low - y, y - high)."""
    scores = np.sort(np.maximum(low - actual, actual - high))
    rank = math.ceil((len(scores) + 1) * coverage)
    if rank > len(scores):
        raise ValueError(f"{len(scores)} calibration rides are too few for {coverage:.0%} coverage")
    return float(scores[rank - 1])


def fit(train: pd.DataFrame, calibration: pd.DataFrame, target: str) -> FittedInterval:
    """Fit the quantile models on ``train`` and their margin on ``calibration`` (rides they never saw)."""
    low, high = (quantile_pipeline(q).fit(train[RIDE_COLUMNS], train[target]) for q in QUANTILES)
    rides = calibration[RIDE_COLUMNS]
    margin = conformal_margin(low.predict(rides), high.predict(rides), calibration[target].to_numpy())
    return FittedInterval(low, high, margin, len(calibration))


def metrics(point: Pipeline, interval: FittedInterval, rides: pd.DataFrame, target: str) -> dict[str, float]:
    """Coverage (share of rides ending within their range, as riders are told it: ``served_range``) and
    median width, and the raw quantiles' coverage."""
    actual = rides[target].to_numpy()
    raw_low, raw_high = interval.low.predict(rides[RIDE_COLUMNS]), interval.high.predict(rides[RIDE_COLUMNS])
    margin = interval.margin_minutes
    low, high = served_range(point.predict(rides[RIDE_COLUMNS]), raw_low - margin, raw_high + margin)
    return {
        "interval_coverage": float(np.mean((actual >= low) & (actual <= high))),
        "interval_median_width": float(np.median(high - low)),
        "interval_raw_coverage": float(np.mean((actual >= raw_low) & (actual <= raw_high))),
    }


def write(interval: FittedInterval, rides: pd.DataFrame, calibrated_on: list[str], out_dir: Path) -> list[Path]:
    """The range's files for the model folder: both serving forms (each checked against its pipeline on
    ``rides``) and interval.json. Loaded back as the function loads them before anything is logged."""
    for pipeline, name in ((interval.low, LOW_FORM_FILE), (interval.high, HIGH_FORM_FILE)):
        serving_form.check_parity(pipeline, ServingForm.load(serving_form.write(pipeline, out_dir / name)), rides)
    description = out_dir / INTERVAL_FILE
    description.write_text(
        json.dumps(
            {
                "format": INTERVAL_FORMAT,
                "method": "conformalized quantile regression (Romano et al., 2019)",
                "nominal_coverage": NOMINAL_COVERAGE,
                "quantiles": list(QUANTILES),
                "margin_minutes": interval.margin_minutes,
                "calibrated_on": calibrated_on,
                "calibration_rides": interval.calibration_rides,
            },
            indent=1,
        )
    )
    Interval.load(description)
    return [out_dir / LOW_FORM_FILE, out_dir / HIGH_FORM_FILE, description]
