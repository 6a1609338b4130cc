"""The guarded production rollout: shadow analysis, switch, bake, blocks and rollbacks, durable phases.

The controller runs for real (its thread, its phases, its story); the deployments are fakes and
the live answers come from a fake stream whose answers depend on what each deployment serves.
tests/test_analysis.py judges real models on real rides; tests/test_rollout_faults.py runs all of
this on the local stack.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from rollout import reconcile
from rollout.analysis import Answer
from rollout.reconcile import Deployment, Guard, MemoryStory, Rollout, ShadowSlot
from rollout.settings import AnalysisSettings

V1, V2 = (Deployment(str(v), f"run-{v}", f"gs://models/m-{v}") for v in (1, 2))
FAST = AnalysisSettings(
    shadow_min_rides=20,
    shadow_max_minutes=0.05,
    bake_minutes=0.005,
    bake_min_rides=20,
    bake_max_minutes=0.05,
    answer_grace_seconds=0,
    min_outcomes=0,
)


class Registry:
    def __init__(self, story: MemoryStory, **aliases: Deployment):
        self.story, self.versions = story, {d.version: d for d in aliases.values()}
        for alias, deployment in aliases.items():
            story.aliases[alias] = deployment.version
        self.versions.update({V1.version: V1, V2.version: V2})

    def resolve(self, alias: str) -> Deployment | None:
        version = self.story.aliases.get(alias)
        return self.versions.get(version) if version else None


class Deployed:
    name = "fake deployment"

    def __init__(self, serving: Deployment | None = None):
        self.current, self.deployed = serving, []

    def serving(self) -> Deployment | None:
        return self.current

    def deploy(self, model: Deployment) -> None:
        self.deployed.append(model.version)
        self.current = model


class LiveStream:
    """Rides at ``rate`` a second since the stream began; each deployment answers each ride with its version's answer.

    ``answer[version](i)`` is that version's answer to ride i, or None for no answer; ``broken_when_serving``:
    versions that stop answering once they answer riders (a fault the shadow could not see). Like LiveAnswers,
    it knows only rides answered since it started (a restarted controller's reader starts empty). With
    ``outcome_delay`` (seconds), ride i's actual duration, ``actual(i)``, comes back that long after its answers,
    as a completed ride would."""

    def __init__(
        self,
        production: Deployed,
        shadow: Deployed,
        answer: dict,
        broken_when_serving: tuple[str, ...] = (),
        rate: float = 200,
        outcome_delay: float | None = None,
        actual=None,
    ):
        self.production, self.shadow, self.answer = production, shadow, answer
        self.broken_when_serving = broken_when_serving
        self.windows_since: set[float] = set()
        self.rate, self.outcome_delay, self.actual = rate, outcome_delay, actual or served
        self.started_at = time.time()

    def window(self, baseline: str, candidate: str, since: float, grace: float):
        self.windows_since.add(since)
        now = time.time()
        opened = max(since, self.started_at, now - 60)
        rides = max(0, int((now - opened) * self.rate))
        answering = {d.current.version for d in (self.production, self.shadow) if d.current is not None}

        def of(version: str, i: int) -> Answer | None:
            if version not in answering:
                return None
            if version in self.broken_when_serving and self.production.current.version == version:
                return None
            minutes = self.answer[version](i)
            return None if minutes is None else Answer(minutes, False, 0.4, since)

        pairs = [(i, of(baseline, i), of(candidate, i)) for i in range(rides)]
        pairs = [(i, b, c) for i, b, c in pairs if b is not None]
        window = [b for _, b, _ in pairs], [c for _, _, c in pairs], 0, 0
        if self.outcome_delay is None:
            return window
        ended = now - self.outcome_delay  # ride i was answered at opened + i / rate
        return (*window, [self.actual(i) if opened + i / self.rate <= ended else None for i, _, _ in pairs])


def served(i: int) -> float:
    return 8.0 + i % 13


def retrained(i: int) -> float:
    return served(i) + (0.6 if i % 2 else -0.5)  # close to v1, ride by ride


def shuffled(i: int) -> float:
    return served(i) + (6.0 if i % 2 else -6.0)  # in bounds, right on average, wrong for every ride


@pytest.fixture(autouse=True)
def quick_windows(monkeypatch):
    """The settle before a window opens (2 s, for rides in flight on a real stream) is moot on this fake one."""
    monkeypatch.setattr(reconcile, "WINDOW_SETTLE_SECONDS", 0.1)


def guarded(
    story: MemoryStory,
    answer_of_v2,
    broken_when_serving=(),
    production=V1,
    shadow=None,
    aliases=None,
    settings=FAST,
    **stream_options,
):
    registry = Registry(story, **(aliases or {"production": V2}))
    target, shadow_target = Deployed(production), Deployed(shadow)
    stream = LiveStream(target, shadow_target, {"1": served, "2": answer_of_v2}, broken_when_serving, **stream_options)
    guard = Guard(shadow_target, stream, settings, ShadowSlot())
    rollout = Rollout("production", registry.resolve, target, 0.05, 0.2, story=story, guard=guard, resync_seconds=0.2)
    return rollout, target, shadow_target


def test_a_retrained_version_goes_through_shadow_and_bake_to_riders_and_its_page_says_how():
    story = MemoryStory()
    rollout, target, shadow = guarded(story, retrained)
    assert "v2 serving after" in rollout.reconcile()
    assert target.deployed == ["2"]  # riders moved once
    assert shadow.deployed == ["2", "1"]  # v2 answered beside v1, then v1 stayed warm beside v2
    tags, page = story.tags["2"], "\n".join(story.pages["2"])
    assert tags["rollout_status"] == "serving production" and tags["rollout_served_production"] == "true"
    assert "Shadow analysis passed" in page and "Bake passed" in page and "Rolled out to production" in page
    assert "median |v2 - v1| 0.5" in page or "median |v2 - v1| 0.6" in page
    assert rollout.reconcile() == "already serving v2"


def test_a_broken_version_is_blocked_in_shadow_with_its_reason_and_riders_never_get_it():
    story = MemoryStory()
    rollout, target, shadow = guarded(story, shuffled)
    message = rollout.reconcile()
    assert "blocked at shadow analysis" in message and "median |candidate - serving|" in message
    assert target.deployed == [] and target.current == V1
    assert story.aliases["production"] == "1"  # the registry names what riders get again
    assert story.tags["2"]["rollout_status"] == "blocked" and "median" in story.tags["2"]["rollout_reason"]
    assert '"rides"' in story.tags["2"]["rollout_figures"]
    story.aliases["production"] = "2"  # promoted again as it was: blocked stays blocked, nothing re-runs
    assert "is blocked" in rollout.reconcile() and shadow.deployed == ["2"] and story.aliases["production"] == "1"


def test_a_broken_version_is_blocked_on_its_minimum_of_rides_without_waiting_for_outcomes():
    """Its answers are out of bounds on the shadow's minimum of rides: outcomes could only add a breach, so the
    shadow decides then, not at its time limit (which kept a broken version in shadow the whole hour)."""
    story = MemoryStory()
    waits_for_outcomes = replace(FAST, min_outcomes=100, shadow_max_minutes=1.0)  # no outcome ever comes here
    rollout, target, _ = guarded(story, shuffled, settings=waits_for_outcomes)
    assert "blocked at shadow analysis" in rollout.reconcile()
    figures = json.loads(story.tags["2"]["rollout_figures"])
    assert figures["rides"] >= 20 and figures["outcomes"] == 0
    assert figures["seconds"] < 60, figures  # decided on its rides, before the shadow's time ran out
    assert target.deployed == []


def test_a_good_version_slow_to_answer_its_first_rides_is_not_blocked_early():
    """Only what its answers say decides early: a new revision's first rides missing (scaling out, a push backing
    off) is a rate more rides bring down, so the shadow waits for its outcomes or its limit as usual."""
    story = MemoryStory()
    waits_for_outcomes = replace(FAST, min_outcomes=100, shadow_max_minutes=0.1)  # no outcome comes here

    cold_until = time.monotonic() + 1.5  # its first checks on its minimum of rides see a fifth of them missing

    def cold_then_retrained(i: int) -> float | None:
        return None if i % 5 == 0 and time.monotonic() < cold_until else retrained(i)

    rollout, target, _ = guarded(story, cold_then_retrained, settings=waits_for_outcomes)
    message = rollout.reconcile()
    assert "blocked" not in message and target.current.version == "2", message
    shadow = json.loads(story.tags["2"]["rollout_shadow"])
    assert shadow["rides"] > 200 and shadow["missing_rate"] <= FAST.max_missing_rate, shadow


def test_a_breach_during_the_bake_sends_riders_back_to_the_version_before():
    story = MemoryStory()
    rollout, target, _shadow = guarded(story, retrained, broken_when_serving=("2",))
    message = rollout.reconcile()
    assert "blocked at bake" in message and "unanswered" in message
    assert target.deployed == ["2", "1"] and target.current == V1  # switched, then rolled back
    assert story.aliases["production"] == "1" and story.tags["2"]["rollout_phase"] == "bake"
    assert "Riders went back on v1" in story.pages["2"][-1]
    assert rollout.history[-1]["outcome"] == "rolled back" and "rollback_seconds" in rollout.history[-1]["figures"]


def test_a_controller_stopped_late_in_the_shadow_opens_a_new_window_and_passes_a_good_version():
    """Issue 33: the restarted controller kept the phase's old clock but not its evidence (its reader starts
    empty), and blocked a good version for "0 rides". A resumed shadow starts its window anew."""
    story = MemoryStory()
    slow = AnalysisSettings(**{**FAST.__dict__, "shadow_min_rides": 10**9, "shadow_max_minutes": 0.1})
    rollout, target, shadow = guarded(story, retrained)
    rollout._guard.analysis = slow  # this one never gathers enough rides: it is stopped meanwhile
    rollout.start()
    deadline = time.monotonic() + 5
    while story.tags.get("2", {}).get("rollout_phase") != "shadow" and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    rollout.stop()  # killed mid-shadow: its phase is in the version's tags
    tags = story.tags["2"]
    assert (tags["rollout_phase"], tags["rollout_from"], tags["rollout_attempts"]) == ("shadow", "1", "1")
    assert target.deployed == [] and shadow.deployed == ["2"]
    story.tags["2"]["rollout_phase_started_at"] = str(time.time() - 3600)  # it was down an hour: past the limit

    stream = LiveStream(target, shadow, {"1": served, "2": retrained})  # the restarted controller's reader: empty
    restarted = Rollout("production", rollout._resolve, target, story=story, guard=Guard(shadow, stream, FAST, ShadowSlot()))
    message = restarted.reconcile()
    assert "v2 serving after" in message, message
    assert shadow.deployed == ["2", "1"]  # v2 was already in shadow: not deployed again
    assert story.tags["2"]["rollout_attempts"] == "2"
    shadow_figures = restarted.history[-1]["figures"]["shadow"]
    assert shadow_figures["rides"] >= FAST.shadow_min_rides and shadow_figures["window_opened_at"] > time.time() - 60
    assert any("its window starts anew" in event for event in story.pages["2"])


BAKE_FROM_V1 = '{"version": "1", "run_id": "run-1", "artifact_uri": "gs://models/m-1", "deployed_at": null}'


def _baking_since(story: MemoryStory, began: float) -> None:
    story.tags["2"] = {
        "rollout_phase": "bake",
        "rollout_phase_started_at": str(began),
        "rollout_from": "1",
        "rollout_from_deployment": BAKE_FROM_V1,
        "rollout_attempts": "1",
    }


def test_a_controller_restarted_during_the_bake_finishes_it_on_a_window_of_its_own():
    story = MemoryStory()
    rollout, target, _shadow = guarded(story, retrained, production=V2, shadow=V1)
    _baking_since(story, time.time() - 1)
    assert "bake resumed and passed" in rollout.reconcile()
    assert story.tags["2"]["rollout_phase"] == "serving" and target.deployed == []


def test_a_controller_down_past_the_bakes_time_bakes_anew_and_never_passes_an_empty_bake():
    """Issue 33: down for more than 30 minutes during a bake, the restarted controller passed the bake at once
    with 0 rides and marked the version known good forever."""
    story = MemoryStory()
    rollout, target, _shadow = guarded(story, retrained, production=V2, shadow=V1)
    _baking_since(story, time.time() - 40 * 60)
    assert "bake resumed and passed" in rollout.reconcile()
    bake = json.loads(story.tags["2"]["rollout_bake"])
    assert bake["rides"] >= FAST.bake_min_rides, bake  # judged on rides of its own window, not on none

    quiet = MemoryStory()  # no traffic at all: the bake's time runs out with no rides
    rollout, target, _shadow = guarded(quiet, retrained, production=V2, shadow=V1, rate=0)
    _baking_since(quiet, time.time() - 40 * 60)
    message = rollout.reconcile()
    assert "blocked at bake" in message and "only 0 rides" in message, message
    assert target.current == V1 and quiet.aliases["production"] == "1"  # riders back on the version before
    assert quiet.tags["2"]["rollout_status"] == "blocked" and "rollout_served_production" not in quiet.tags["2"]


def test_a_rollback_to_a_version_that_served_before_skips_shadow_and_bake_but_not_preflight():
    story = MemoryStory()
    story.tags["1"] = {"rollout_served_production": "true"}
    checked = []
    rollout, target, shadow = guarded(story, retrained, production=V2, aliases={"production": V1})
    rollout._preflight = lambda model: checked.append(model.version) or _passed()
    assert "(known good)" in rollout.reconcile()
    assert checked == ["1"] and target.deployed == ["1"] and shadow.deployed == []


def test_the_challenger_waits_while_production_borrows_the_shadow_deployment():
    story = MemoryStory()
    rollout, _target, shadow = guarded(story, retrained)
    challenger = Rollout("challenger", lambda alias: V1, shadow, slot=rollout._guard.slot)
    rollout._guard.slot.lend("production")
    assert "lent to the production rollout" in challenger.reconcile() and shadow.deployed == []
    rollout._guard.slot.give_back()
    assert "v1 serving after" in challenger.reconcile() and shadow.deployed == ["1"]


def _passed():
    from rollout.preflight import Preflight

    return Preflight(True, "answers its 200 reference rides as recorded", 200, 0.0)


def test_the_controllers_readyz_shows_the_phase_and_its_figures_while_a_rollout_runs():
    import threading

    from rollout.app import create_app
    from rollout.settings import RolloutSettings
    from rollout.webhook import WebhookVerifier

    story = MemoryStory()
    rollout, _, _ = guarded(story, retrained)
    rollout._guard.analysis = AnalysisSettings(**{**FAST.__dict__, "shadow_min_rides": 10**9, "shadow_max_minutes": 0.1})
    settings = RolloutSettings(
        "secret", "ride-duration", {"production": "function"}, 300, 0.05, 0.2, operator_token="op", status_cache_seconds=0
    )
    client = create_app(settings, rollouts={"production": rollout}, verifier=WebhookVerifier("secret")).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = "Bearer op"  # the figures are an operator's
    worker = threading.Thread(target=rollout.reconcile)
    worker.start()
    try:
        deadline, body = time.monotonic() + 5, {}
        while time.monotonic() < deadline:
            body = client.get("/readyz").get_json()
            phase = body["aliases"]["production"]["phase"]
            if phase and phase["phase"] == "shadow" and (phase.get("figures") or {}).get("rides"):
                break
            time.sleep(0.05)
        phase = body["aliases"]["production"]["phase"]
        assert body["status"] == "ok" and body["aliases"]["production"]["state"] == "rolling out"
        assert (phase["version"], phase["from"], phase["phase"]) == ("2", "1", "shadow")
        assert phase["figures"]["rides"] > 0 and phase["figures"]["median_abs_diff_minutes"] is not None
    finally:
        worker.join(10)
    assert client.get("/readyz").get_json()["aliases"]["production"]["phase"] is None  # it ended (too few rides)
    assert "only" in rollout.history[-1]["message"] and story.aliases["production"] == "1"


def test_a_shadow_deployment_with_no_version_wanted_is_retired():
    """After a production rollout (the blocked candidate, or the version riders left, in shadow) with no
    challenger alias, the shadow stops answering instead of serving a version nobody named."""

    class Shadow(Deployed):
        def retire(self):
            self.current = None

    shadow = Shadow(V2)  # a blocked candidate, left in shadow
    challenger = Rollout("challenger", lambda alias: None, shadow, slot=ShadowSlot())
    assert "no longer in shadow" in challenger.reconcile() and shadow.current is None
    assert "nothing to roll out" in challenger.reconcile()
    production = Deployed(V1)
    assert "nothing to roll out" in Rollout("production", lambda alias: None, production).reconcile()
    assert production.current == V1  # production is never retired


# --- judgement on outcomes, with real delays ------------------------------------------------------------
WITH_OUTCOMES = AnalysisSettings(**{**FAST.__dict__, "min_outcomes": 50, "shadow_max_minutes": 0.25, "bootstrap_samples": 300})


def worse(i: int) -> float:
    return served(i) + (1.5 if i % 2 else -1.5)  # within the deviation thresholds (1.5 < 2 min), 1.5 min worse in RMSE


def test_the_shadow_waits_for_outcomes_and_its_decision_says_it_applied_the_rmse_gate():
    """Issue 33: the shadow closed at its minimum of rides, long before any ride had ended: the RMSE gate never applied."""
    story = MemoryStory()
    rollout, _target, _ = guarded(story, retrained, settings=WITH_OUTCOMES, outcome_delay=1.0, actual=retrained)
    message = rollout.reconcile()
    assert "v2 serving after" in message and "RMSE gate: applied on" in message, message
    shadow = json.loads(story.tags["2"]["rollout_shadow"])
    assert shadow["outcomes"] >= 50 and shadow["seconds"] >= 1.0, shadow
    assert story.tags["2"]["rollout_shadow_rmse_gate"].startswith("RMSE gate: applied on")
    assert any("RMSE gate: applied on" in event for event in story.pages["2"])


def test_the_rmse_gate_blocks_a_worse_candidate_whose_deviation_stays_within_its_thresholds():
    story = MemoryStory()
    rollout, target, _ = guarded(story, worse, settings=WITH_OUTCOMES, outcome_delay=1.0)
    message = rollout.reconcile()
    assert "blocked at shadow analysis" in message and "RMSE worse" in message, message
    assert "median" not in story.tags["2"]["rollout_reason"]  # the RMSE gate itself, not the deviation
    assert target.deployed == [] and story.aliases["production"] == "1"


def test_a_shadow_whose_outcomes_do_not_come_in_time_decides_on_its_rides_and_says_so():
    story = MemoryStory()
    settings = AnalysisSettings(**{**WITH_OUTCOMES.__dict__, "shadow_max_minutes": 0.05})
    rollout, _, _ = guarded(story, retrained, settings=settings, outcome_delay=3600)
    message = rollout.reconcile()
    assert "v2 serving after" in message and "RMSE gate: not applied, 0 outcomes of 50 needed" in message, message
    assert story.tags["2"]["rollout_shadow_rmse_gate"] == "RMSE gate: not applied, 0 outcomes of 50 needed"
    assert json.loads(story.tags["2"]["rollout_shadow"])["seconds"] >= 0.05 * 60


def test_the_expected_length_of_a_guarded_rollout_follows_the_settings_and_the_traffic():
    from rollout.reconcile import expected_rollout_minutes

    settings = AnalysisSettings()
    at = {rate: expected_rollout_minutes(settings, rate) for rate in (1, 10, 100)}
    for rate, expected in at.items():
        assert expected["rmse_gate_in_shadow"] and expected["shadow_outcomes"] >= settings.min_outcomes, expected
        assert expected["shadow_minutes"] > settings.shadow_min_rides / rate / 60  # outcomes, not rides, close it
        assert expected["bake_minutes"] == settings.bake_minutes
    assert at[1]["shadow_minutes"] > at[10]["shadow_minutes"] > at[100]["shadow_minutes"] > 1  # no ride ends within a minute
    trickle = expected_rollout_minutes(settings, 0.01)  # 200 rides need 5.5 h: the shadow's limit comes first
    assert trickle["shadow_minutes"] == settings.shadow_max_minutes and not trickle["shadow_enough_rides"]


# --- a superseded version never reaches riders ----------------------------------------------------------
def test_a_known_good_version_whose_alias_moved_on_before_its_switch_never_reaches_riders():
    """Issue 33: four alias moves within 0.36 s (v1, v2, v1, v2) and v1, known good, answered riders for 15 s."""
    import threading

    story = MemoryStory()
    story.tags["1"] = {"rollout_served_production": "true"}  # v1 served before: a rollback to it skips the analysis
    rollout, target, _shadow = guarded(story, retrained, production=V2, shadow=V1)
    checking = threading.Event()

    def preflight(model):  # pre-flight takes longer than the alias's moves
        checking.set()
        time.sleep(0.6)
        return _passed()

    rollout._preflight = preflight
    rollout.start()
    try:
        assert rollout.wait_idle(5)
        story.aliases["production"] = "1"
        rollout.request("alias moved to v1")
        assert checking.wait(5)
        for version in ("2", "1", "2"):
            time.sleep(0.12)
            story.aliases["production"] = version
            rollout.request(f"alias moved to v{version}")
        time.sleep(1)
        assert rollout.wait_idle(10)
    finally:
        rollout.stop()
    assert "1" not in target.deployed and target.current == V2, target.deployed
    assert any(h["outcome"] == "superseded" for h in rollout.history)


def test_riders_go_back_when_the_alias_moves_back_during_the_switch():
    story = MemoryStory()
    story.tags["1"] = {"rollout_served_production": "true"}
    rollout, target, _ = guarded(story, retrained, production=V2, aliases={"production": V1})
    deploy = target.deploy

    def deploy_while_the_alias_moves(model):
        deploy(model)
        story.aliases["production"] = "2"  # moved back while the traffic moved

    target.deploy = deploy_while_the_alias_moves
    try:
        rollout.reconcile()
    except Exception as exc:
        assert "moved to v2 during the switch" in str(exc)
    assert target.deployed == ["1", "2"] and target.current == V2  # back on what the alias names at once


# --- record first, then act; could not evaluate is not a block ------------------------------------------
def test_a_bake_breach_is_recorded_before_riders_go_back_so_a_registry_error_never_puts_them_back_on_it():
    class FailingOnce(MemoryStory):
        failed = False

        def tell(self, version, paragraph, **tags):
            if tags.get("rollout_status") == "blocked" and not self.failed:
                self.failed = True
                raise RuntimeError("MLflow: 503 Service Unavailable")
            super().tell(version, paragraph, **tags)

    story = FailingOnce()
    rollout, target, _ = guarded(story, retrained, broken_when_serving=("2",))
    try:
        rollout.reconcile()
    except RuntimeError as exc:
        assert "503" in str(exc)
    message = rollout.reconcile()  # the retry
    assert "blocked at bake" in message, message
    assert target.deployed == ["2", "1"] and target.current == V1  # riders never put back on v2
    assert story.aliases["production"] == "1" and story.tags["2"]["rollout_status"] == "blocked"


def test_a_preflight_that_could_not_be_evaluated_is_retried_not_blocked():
    from types import SimpleNamespace

    from rollout.reconcile import NotEvaluated

    story = MemoryStory()
    rollout, target, _ = guarded(story, retrained)
    rollout._preflight = lambda model: SimpleNamespace(
        passed=False, evaluated=False, reason="the model store did not answer", max_diff_minutes=None
    )
    with pytest.raises(NotEvaluated, match="could not be evaluated"):
        rollout.reconcile()
    assert story.tags["2"].get("rollout_status") != "blocked" and story.aliases["production"] == "2"
    assert target.deployed == []
