"""The shadow analysis's default thresholds on real models and real rides: a retrained version passes,
a broken one (trained on shuffled durations: loadable, in bounds, it passes pre-flight) is blocked."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

from data import load_trips, month_uri
from ride_contract.quality import paired_rmse_difference, paired_verdict
from ride_contract.result import served_minutes
from rollout.analysis import KEPT_RIDE_BYTES, Answer, LiveAnswers, breaches, figures
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


def test_outcomes_are_always_counted_and_the_interval_is_computed_only_when_asked():
    settings = AnalysisSettings(min_outcomes=3, bootstrap_samples=200)
    assert figures([], [], actual=[], settings=settings)["outcomes"] == 0
    baseline = [Answer(10.0 + i % 7, False, 1.0, 0.0) for i in range(10)]
    candidate = [Answer(11.0 + i % 5, False, 1.0, 0.0) for i in range(9)] + [None]
    actual = [12.0, None, 14.0, 9.0, 20.0, None, 11.0, 13.0, 10.0, 15.0]  # the last: the candidate gave no answer
    assert figures(baseline, candidate, settings=settings)["outcomes"] == 0  # no outcomes read at all
    watching = figures(baseline, candidate, actual=actual, settings=settings, interval=False)
    assert watching["outcomes"] == 7 and "rmse_diff_ci95" not in watching and "rmse_diff_minutes" not in watching
    deciding = figures(baseline, candidate, actual=actual, settings=settings)
    assert deciding["outcomes"] == 7 and deciding["rmse_diff_ci95"][0] <= deciding["rmse_diff_minutes"]
    assert {k: v for k, v in deciding.items() if not k.startswith("rmse_diff")} == watching
    too_few = figures(baseline, candidate, actual=actual, settings=AnalysisSettings(min_outcomes=8))
    assert too_few["outcomes"] == 7 and "rmse_diff_ci95" not in too_few


def test_the_bootstrap_resamples_in_chunks_the_same_draws_in_bounded_memory(monkeypatch):
    """Chunked, it gives exactly what drawing every resample at once gives; its peak memory no longer grows with
    rides x resamples (at once, 20k rides x 200 resamples took 64 MB; benchmarks/bootstrap_bench.py: 100k rides)."""
    import tracemalloc

    from ride_contract import quality

    rng = np.random.default_rng(4)
    actual = rng.uniform(5, 40, 20_000)
    baseline, candidate = actual + rng.normal(0, 5, actual.size), actual + rng.normal(0, 5.2, actual.size)
    tracemalloc.start()
    try:
        chunked = paired_rmse_difference(candidate, baseline, actual, samples=200)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, f"{peak / 1e6:.1f} MB"
    monkeypatch.setattr(quality, "BOOTSTRAP_CHUNK_ELEMENTS", 200 * actual.size)  # every resample in one draw
    assert paired_rmse_difference(candidate, baseline, actual, samples=200) == chunked
    monkeypatch.setattr(quality, "BOOTSTRAP_CHUNK_ELEMENTS", 3 * actual.size + 7)  # chunks that do not divide 200
    assert paired_rmse_difference(candidate, baseline, actual, samples=200) == chunked


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _answer(ride: str, version: str, minutes: float = 12.0) -> bytes:
    return json.dumps({"ride_id": ride, "duration_final": minutes, "model_version": version, "answer_ms": 3.0}).encode()


def _outcome(ride: str, actual: float) -> bytes:
    from ride_contract.outcome import CompletedRide

    body = {"ride_id": ride, "fingerprint": "f", "requested_at": 0, "duration_coarse": 10.0, "actual_minutes": actual}
    ride_fields = {"datetime": "2021-03-04T18:59:00", "PULocationID": 196, "DOLocationID": 28, "trip_distance": 2.5}
    return CompletedRide(**body, ride=ride_fields, outcome_at=1).model_dump_json().encode()


def _live(clock: Clock, **settings) -> LiveAnswers:
    return LiveAnswers("p", ["results"], subscriber=object(), settings=AnalysisSettings(**settings), clock=clock)


def test_kept_answers_wait_for_an_outcome_as_late_as_the_longest_ride_after_the_windows():
    clock = Clock()
    settings = AnalysisSettings()
    answers = _live(clock)
    assert answers.retention_seconds == 60 * (60 + settings.shadow_max_minutes + settings.bake_minutes)
    answers.record(_answer("r1", "1")), answers.record(_answer("r1", "2"))
    since = clock.now
    clock.now += answers.retention_seconds - 1  # the longest ride, ending as the bake closes
    answers.record_outcome(_outcome("r1", 14.0))
    assert answers.window("1", "2", since, 0)[4] == [14.0]
    clock.now += 2  # past its retention: gone
    assert answers.window("1", "2", since, 0)[0] == [] and answers.kept()["evicted_before_outcomes"] == 0
    assert _live(clock, answer_retention_minutes=5).retention_seconds == 300  # ROLLOUT_ANSWER_RETENTION_MINUTES


def test_beyond_the_count_guard_rides_are_evicted_counted_and_logged(caplog):
    clock = Clock()
    answers = _live(clock, max_kept_rides=100)
    with caplog.at_level("WARNING", logger="rollout"):
        for ride in range(150):
            clock.now += 0.01
            answers.record(_answer(f"r{ride}", "1"))
    assert answers.kept()["rides"] == 100 and answers.kept()["evicted_before_outcomes"] == 50
    assert len(answers.window("1", "2", 0, 0)[0]) == 100  # the newest hundred
    assert sum("evicted before their outcomes" in r.getMessage() for r in caplog.records) == 1  # logged, not per ride


def test_the_first_outcome_of_a_ride_is_its_outcome_and_repeats_are_ignored():
    clock = Clock()
    answers = _live(clock)
    answers.record(_answer("r1", "1")), answers.record(_answer("r1", "2"))
    assert answers.record_outcome(_outcome("r1", 12.0)) and answers.record_outcome(_outcome("r1", 45.0))
    # An outcome read before the ride's answers (another subscription's backlog) is its outcome all the same.
    answers.record_outcome(_outcome("r2", 20.0)), answers.record_outcome(_outcome("r2", 1.0))
    answers.record(_answer("r2", "1")), answers.record(_answer("r2", "2"))
    assert answers.window("1", "2", 0, 0)[4] == [12.0, 20.0] and answers.kept()["repeated_outcomes"] == 2


def test_a_kept_ride_costs_at_most_its_stated_bytes():
    """Two answers and an outcome per ride, as the shadow keeps them, measured as the benchmark measures them:
    max_kept_rides x KEPT_RIDE_BYTES bounds the kept answers' memory."""
    from benchmarks.bootstrap_bench import kept_rides

    measured = kept_rides(20_000)
    assert measured["bytes_per_kept_ride"]["value"] <= KEPT_RIDE_BYTES, measured


def test_a_window_holds_the_rides_published_since_it_opened_oldest_first():
    clock = Clock()
    answers = _live(clock)
    for ride in range(10):
        clock.now += 30
        answers.record(_answer(f"r{ride}", "1", ride), at=clock.now), answers.record(_answer(f"r{ride}", "2", ride))
    since = clock.now - 65  # the last three
    baseline, candidate, *_ = answers.window("1", "2", since, grace_seconds=20)  # the newest had 0 s to be paired
    assert [a.duration for a in baseline] == [7.0, 8.0] and [c.duration for c in candidate] == [7.0, 8.0]
