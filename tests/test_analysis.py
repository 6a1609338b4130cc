"""The shadow analysis's default thresholds on real models and real rides: a retrained version passes,
a broken one (trained on shuffled durations: loadable, in bounds, it passes pre-flight) is blocked."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

from data import load_trips, month_uri
from ride_contract.quality import paired_rmse_difference, paired_verdict
from ride_contract.result import served_minutes
from rollout.analysis import Answer, breaches, figures
from rollout.settings import AnalysisSettings
from training.train import search


@pytest.fixture(scope="module")
def months():
    return {m: load_trips([month_uri(m, str(DATA))]) for m in ("2021-01", "2021-02", "2021-03", "2022-01")}


def _answers(model, rides) -> list[Answer]:
    return [Answer(float(m), False, 0.5, 0.0) for m in served_minutes(model.predict(rides))]


def test_the_defaults_pass_a_retrained_version_and_block_one_trained_on_shuffled_durations(months):
    jan, feb, live = months["2021-01"], months["2021-02"], months["2021-03"].sample(1_000, random_state=7)
    serving, _, _ = search("hgb", 1, jan.sample(12_000, random_state=0), feb)
    # Retrained on more rides (another sample of January and January 2022), as the demo's v2 is.
    more = pd.concat([jan.sample(12_000, random_state=1), months["2022-01"].sample(12_000, random_state=1)], ignore_index=True)
    retrained, _, _ = search("hgb", 1, more, feb)
    shuffled = jan.sample(12_000, random_state=0).assign(
        duration=lambda f: np.random.default_rng(0).permutation(f["duration"].to_numpy())
    )
    broken, _, _ = search("hgb", 1, shuffled, feb)
    defaults = AnalysisSettings()
    baseline = _answers(serving, live)

    good = figures(baseline, _answers(retrained, live), settings=defaults)
    assert breaches(good, defaults) == [], good
    assert good["median_abs_diff_minutes"] < 0.75 * defaults.max_median_abs_diff_minutes  # not a near pass

    bad = figures(baseline, _answers(broken, live), settings=defaults)
    found = breaches(bad, defaults)
    assert any("median |candidate - serving|" in b for b in found), bad
    assert bad["median_abs_diff_minutes"] > 2 * defaults.max_median_abs_diff_minutes  # far beyond it

    # Where the actual durations have come back, the paired bootstrap tells the same story in RMSE.
    actual = live["duration"].tolist()
    judged_good = figures(baseline, _answers(retrained, live), actual=actual, settings=defaults)
    judged_bad = figures(baseline, _answers(broken, live), actual=actual, settings=defaults)
    assert judged_good["rmse_diff_ci95"][0] < defaults.max_rmse_increase_minutes, judged_good
    assert judged_bad["rmse_diff_ci95"][0] > 3, judged_bad
    assert any("RMSE worse" in b for b in breaches(judged_bad, defaults))


def test_unanswered_rides_dead_letters_and_out_of_bounds_answers_are_each_a_breach():
    settings = AnalysisSettings()
    baseline = [Answer(10.0, False, 1.0, 0.0) for _ in range(200)]
    silent = figures(baseline, [Answer(10.0, False, 1.0, 0.0)] * 190 + [None] * 10, settings=settings)
    assert silent["missing_rate"] == 0.05 and any("unanswered" in b for b in breaches(silent, settings))
    refusing = figures(baseline, [Answer(10.0, False, 1.0, 0.0)] * 200, candidate_dead_letters=5, settings=settings)
    assert any("dead letters" in b for b in breaches(refusing, settings))
    clipping = figures(baseline, [Answer(1.0, True, 1.0, 0.0)] * 20 + [Answer(10.0, False, 1.0, 0.0)] * 180, settings=settings)
    assert any("out-of-bounds" in b for b in breaches(clipping, settings))
    slow = figures(baseline, [Answer(10.0, False, 900.0, 0.0)] * 200, settings=settings)
    assert any("p95 answer ms" in b for b in breaches(slow, settings))
    assert breaches(figures(baseline, list(baseline), settings=settings), settings) == []


def test_the_paired_bootstrap_interval_covers_the_difference_and_shrinks_with_more_rides():
    rng = np.random.default_rng(3)
    actual = rng.uniform(5, 40, 4_000)
    baseline = actual + rng.normal(0, 5, actual.size)
    candidate = actual + rng.normal(0, 5.5, actual.size)
    low, estimate, high = paired_rmse_difference(candidate, baseline, actual, samples=500)
    assert low < estimate < high and low < 0.5 < high  # the true difference: 5.5 - 5 min
    few = paired_rmse_difference(candidate[:200], baseline[:200], actual[:200], samples=500)
    assert few[2] - few[0] > high - low


@pytest.mark.parametrize("sign", [-1, 1])
def test_the_verdict_takes_a_side_only_once_the_interval_excludes_zero(sign):
    """Synthetic pairs with a known difference: the challenger's errors 0.5 min larger (or smaller) in RMSE."""
    rng = np.random.default_rng(11)
    actual = rng.uniform(5, 40, 20_000)
    champion = actual + rng.normal(0, 5, actual.size)
    challenger = actual + rng.normal(0, 5 + sign * 0.5, actual.size)
    few = paired_rmse_difference(challenger[:60], champion[:60], actual[:60], samples=1000)
    assert paired_verdict(*few, rides=60, candidate="v2", baseline="v1").startswith("not yet distinguishable")
    many = paired_rmse_difference(challenger, champion, actual, samples=1000)
    verdict = paired_verdict(*many, rides=20_000, candidate="v2", baseline="v1")
    assert verdict.startswith("v2 better" if sign < 0 else "v2 worse"), verdict
    assert many[0] < sign * 0.5 < many[2]  # and the interval holds the true difference


def test_every_threshold_is_read_from_its_environment_variable_and_a_bad_one_is_named(monkeypatch):
    monkeypatch.setenv("ROLLOUT_SHADOW_MIN_RIDES", "60")
    monkeypatch.setenv("ROLLOUT_MAX_MEDIAN_ABS_DIFF_MINUTES", "1.5")
    settings = AnalysisSettings.from_env()
    assert (settings.shadow_min_rides, settings.max_median_abs_diff_minutes) == (60, 1.5)
    monkeypatch.setenv("ROLLOUT_BAKE_MIN_RIDES", "lots")
    with pytest.raises(RuntimeError, match="ROLLOUT_BAKE_MIN_RIDES='lots': expected a whole number"):
        AnalysisSettings.from_env()
