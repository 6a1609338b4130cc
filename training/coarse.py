"""Fit the backend's coarse estimator (per-hour linear fit of minutes on miles).

python -m training.coarse --month 2021-01 --out backend/coarse_model.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import root_mean_squared_error

from data import load_trips, month_uri
from ride_contract.coarse import CoarseEstimator
from training.settings import Settings

ARTIFACT_FILE = "coarse_model.json"
# Beyond this a straight line in miles over-predicts (highway trips); it is also where
# TLC distance glitches start. Longer trips are estimated as this long.
MAX_FIT_DISTANCE = 30.0


def fit(trips: pd.DataFrame, trained_on: str = "") -> CoarseEstimator:
    usable = trips[(trips["trip_distance"] > 0) & (trips["trip_distance"] <= MAX_FIT_DISTANCE)]
    hours = usable["datetime"].dt.hour.to_numpy()
    intercepts, slopes = [], []
    for hour in range(24):
        miles = usable["trip_distance"].to_numpy()[hours == hour]
        minutes = usable["duration"].to_numpy()[hours == hour]
        slope, intercept = np.polyfit(miles, minutes, deg=1)
        intercepts.append(float(intercept))
        slopes.append(float(slope))
    return CoarseEstimator(intercepts, slopes, MAX_FIT_DISTANCE, trained_on)


def rmse(estimator: CoarseEstimator, trips: pd.DataFrame) -> float:
    predicted = estimator.predict(trips["datetime"].dt.hour.to_numpy(), trips["trip_distance"].to_numpy())
    return float(root_mean_squared_error(trips["duration"], predicted))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--month", default="2021-01")
    parser.add_argument("--out", type=Path, default=Path("backend/coarse_model.json"))
    args = parser.parse_args(argv)
    uri = month_uri(args.month, Settings.from_env().data_base)
    estimator = fit(load_trips(uri), trained_on=f"green {args.month}")
    args.out.write_text(json.dumps(estimator.to_dict(), indent=1) + "\n")
    print(f"wrote {args.out} (fitted on {uri})")


if __name__ == "__main__":
    main()
