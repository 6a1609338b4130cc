"""The rider's range: the conformal margin on synthetic scores, coverage on real TLC months, and the
quantile models' serving forms scoring as their pipelines."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA

from data import load_trips
from ride_contract.ride import RIDE_COLUMNS
from ride_contract.serving_form import Interval
from ride_contract.sklearn_features import ride_features
from training import interval
from training.models import build_pipeline


def test_the_margin_is_the_finite_sample_quantile_of_the_conformity_scores():
    actual = np.arange(1.0, 11.0)  # 10 rides; a range of [y, y] everywhere but where moved below
    low, high = actual.copy(), actual.copy()
    low[:5] += np.arange(1, 6)  # five rides above their range by 1..5 min: scores 1..5
    high[5:] -= np.arange(6, 11) * 0.1  # five below it by 0.6..1.0 min
    # Scores sorted: 0.6 0.7 0.8 0.9 1 1 2 3 4 5; the ceil(11 * 0.8) = 9th is 4.
    assert interval.conformal_margin(low, high, actual, 0.8) == pytest.approx(4.0)
    # Inside the range the score is negative: a range too wide is narrowed.
    assert interval.conformal_margin(actual - 3, actual + 3, actual, 0.8) == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="too few"):
        interval.conformal_margin(low[:3], high[:3], actual[:3], 0.8)  # ceil(4 * 0.8) = 4 > 3 rides


def test_on_exchangeable_rides_the_calibrated_range_covers_its_nominal_share():
    rng = np.random.default_rng(0)
    actual = rng.gamma(2.0, 6.0, 40_000)
    # Quantile estimates that are too narrow, as fitted quantile models are on new rides.
    low, high = np.full_like(actual, np.quantile(actual, 0.2)), np.full_like(actual, np.quantile(actual, 0.8))
    calibration, test = slice(0, 20_000), slice(20_000, None)
    margin = interval.conformal_margin(low[calibration], high[calibration], actual[calibration])
    covered = np.mean((actual[test] >= low[test] - margin) & (actual[test] <= high[test] + margin))
    assert np.mean((actual[test] >= low[test]) & (actual[test] <= high[test])) < 0.62
    assert covered == pytest.approx(0.8, abs=0.01)


@pytest.mark.parametrize(
    ("train", "calibration", "test"),
    [
        ("2021-03", "2022-01", "2022-02"),  # the project's other months, each range calibrated on the month before
        ("2022-01", "2022-02", "2021-03"),  # and backwards in time, a year apart
    ],
)
def test_the_range_holds_78_to_82_percent_of_another_months_real_rides(train, calibration, test, tmp_path):
    months = {m: load_trips(DATA / f"green_tripdata_{m}.parquet") for m in (train, calibration, test)}
    point = build_pipeline("hgb").fit(months[train][RIDE_COLUMNS], months[train]["duration"])
    ride_range = interval.fit(months[train], months[calibration], "duration")
    figures = interval.metrics(point, ride_range, months[test], "duration")
    assert 0.78 <= figures["interval_coverage"] <= 0.82, figures
    assert figures["interval_raw_coverage"] < 0.76, figures  # what the calibration corrects
    # The serving forms give the same ranges: what the function answers is what was measured here.
    files = interval.write(ride_range, months[test].head(2_000), [calibration], tmp_path)
    served = Interval.load(files[-1]).predict_features(ride_features(months[test][RIDE_COLUMNS].head(2_000)).to_numpy())
    for ours, theirs in zip(served, ride_range.bounds(months[test].head(2_000)), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=0.01)
