"""Champion against challenger on completed rides: paired by ride, in either role, and a side taken only
when the bootstrap interval excludes zero."""

from __future__ import annotations

import numpy as np
import pytest

from flows.challenger_flow import compare, paired
from ride_contract.outcome import CompletedRide, ShadowAnswer

RIDE = {"datetime": "2021-03-04T18:59:00", "PULocationID": 196, "DOLocationID": 28, "trip_distance": 2.5}


def completed(ride_id: str, actual: float, final: tuple[str, float] | None, shadow: tuple[str, float] | None) -> CompletedRide:
    return CompletedRide(
        ride_id=ride_id,
        fingerprint="f",
        ride=RIDE,
        requested_at=0,
        duration_coarse=actual + 3,
        duration_final=final[1] if final else None,
        model_version=final[0] if final else "",
        shadow=[ShadowAnswer(model_version=shadow[0], duration_final=shadow[1])] if shadow else [],
        actual_minutes=actual,
        outcome_at=1,
    )


def test_rides_are_paired_by_version_whichever_deployment_answered():
    rides = [
        completed("a", 10, ("1", 12), ("2", 11)),  # v2 in shadow
        completed("b", 20, ("2", 21), ("1", 22)),  # during the bake: v2 answers riders, v1 in shadow
        completed("c", 30, ("1", 31), None),  # no shadow answer: no pair
        completed("d", 40, None, ("2", 41)),  # the ride failed: v1 never answered
        completed("e", 50, ("1", 52), ("3", 50)),  # another challenger
    ]
    champion, challenger, actual = paired(rides, "1", "2")
    assert actual.tolist() == [10, 20] and champion.tolist() == [12, 22] and challenger.tolist() == [11, 21]


def test_the_comparison_is_undecided_on_few_rides_and_decided_on_many():
    rng = np.random.default_rng(5)
    actual = rng.uniform(5, 40, 8000)
    champion = actual + rng.normal(0, 5, actual.size)
    challenger = actual + rng.normal(0, 4.5, actual.size)  # better by about half a minute of RMSE
    few = compare(champion[:40], challenger[:40], actual[:40], "1", "2", min_rides=40)
    assert few["challenger_better"] is None and few["verdict"].startswith("not yet distinguishable"), few
    many = compare(champion, challenger, actual, "1", "2")
    assert many["challenger_better"] is True and many["verdict"].startswith("v2 better"), many
    low, high = many["rmse_diff_ci95"]
    assert low < many["rmse_diff_minutes"] < high < 0
    assert many["champion_rmse"] == pytest.approx(float(np.sqrt(np.mean((champion - actual) ** 2))), abs=0.001)
    with pytest.raises(ValueError, match="no completed rides answered by both v1 and v2"):
        compare(champion[:0], challenger[:0], actual[:0], "1", "2")


def test_a_handful_of_rides_gets_no_verdict_though_the_challenger_was_closer_on_each():
    """Five rides on which the challenger happened to be closer every time (no real difference): every
    resample says "better", so the bootstrap alone would; below min_rides there is no verdict to give."""
    actual = np.array([8.0, 15.0, 22.0, 11.0, 30.0])
    champion, challenger = actual + np.array([3, -4, 5, 2, -6]), actual + np.array([2, -3, 4, 1, -5])
    result = compare(champion, challenger, actual, "1", "2")
    assert result["challenger_better"] is None and result["rmse_diff_ci95"] is None, result
    assert result["verdict"].startswith("not enough outcomes: 5 of 100"), result
    assert result["challenger_rmse"] < result["champion_rmse"]  # the figures are still there, without a side
