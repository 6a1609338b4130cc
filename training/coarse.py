"""Fit what the backend knows without the model, from one month of real trips: the coarse estimator
(per-hour linear fit of minutes on miles) and the rider page's zone guide (zones by name, the
typical distance between two of them).

python -m training.coarse --month 2021-01 --out backend/coarse_model.json --zones-out backend/zone_guide.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import root_mean_squared_error

from data import load_trips, month_uri, read_zones
from ride_contract.coarse import CoarseEstimator
from ride_contract.ride import MAX_TRIP_DISTANCE_MILES
from ride_contract.zones import MIN_TRIPS, Zone, ZoneGuide
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


def zone_guide(trips: pd.DataFrame, zones: pd.DataFrame, trained_on: str = "") -> ZoneGuide:
    """Zones by name, and the median distance of the month's trips per zone pair and per borough pair
    (pairs with fewer than MIN_TRIPS trips left out). Zero distances and meter glitches do not count."""
    measured = trips[(trips["trip_distance"] > 0) & (trips["trip_distance"] <= MAX_TRIP_DISTANCE_MILES)]
    borough = dict(zip(zones["LocationID"], zones["Borough"], strict=True))
    measured = measured.assign(
        pickup_borough=measured["PULocationID"].map(borough), dropoff_borough=measured["DOLocationID"].map(borough)
    ).dropna(subset=["pickup_borough", "dropoff_borough"])

    def medians(keys: list[str]) -> dict[tuple, tuple[float, int]]:
        grouped = measured.groupby(keys)["trip_distance"].agg(["median", "size"])
        grouped = grouped[grouped["size"] >= MIN_TRIPS]
        return {key: (round(float(row["median"]), 1), int(row["size"])) for key, row in grouped.iterrows()}

    return ZoneGuide(
        [Zone(int(row.LocationID), row.Borough, row.Zone) for row in zones.itertuples()],
        {(int(pu), int(do)): value for (pu, do), value in medians(["PULocationID", "DOLocationID"]).items()},
        medians(["pickup_borough", "dropoff_borough"]),
        trained_on,
    )


def rmse(estimator: CoarseEstimator, trips: pd.DataFrame) -> float:
    predicted = estimator.predict(trips["datetime"].dt.hour.to_numpy(), trips["trip_distance"].to_numpy())
    return float(root_mean_squared_error(trips["duration"], predicted))


def _one_item_per_line(data: dict) -> str:
    """JSON with each zone or pair on a line of its own: people read the file too, and a refit's diff stays small."""

    def entry(key: str, value) -> str:
        if isinstance(value, list):
            return f"{json.dumps(key)}: [\n" + ",\n".join(json.dumps(item) for item in value) + "\n]"
        return f"{json.dumps(key)}: {json.dumps(value)}"

    return "{\n" + ",\n".join(entry(key, value) for key, value in data.items()) + "\n}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--month", default="2021-01")
    parser.add_argument("--out", type=Path, default=Path("backend/coarse_model.json"))
    parser.add_argument("--zones-out", type=Path, default=Path("backend/zone_guide.json"))
    args = parser.parse_args(argv)
    uri = month_uri(args.month, Settings.from_env().data_base)
    trips = load_trips(uri)
    estimator = fit(trips, trained_on=f"green {args.month}")
    args.out.write_text(json.dumps(estimator.to_dict(), indent=1) + "\n")
    guide = zone_guide(trips, read_zones(), trained_on=f"green {args.month}")
    args.zones_out.write_text(_one_item_per_line(guide.to_dict()))
    print(f"wrote {args.out} and {args.zones_out} (fitted on {uri})")


if __name__ == "__main__":
    main()
