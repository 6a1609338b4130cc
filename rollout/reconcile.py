"""Keep a deployment serving the model version one registry alias points at: serialized, idempotent, retried,
and, for production, guarded: a new version reaches riders only after it has proven itself on live rides.

Webhook events only say "look again": the worker reads the alias from the registry
itself, compares it with what the target serves, and deploys only the difference. It
also looks again every ``resync_seconds`` without being told (level-triggered): MLflow
delivers each webhook fire-and-forget, so a lost delivery is corrected within one period. So
a repeated event is a no-op, two quick promotions end on the last one (however the
events interleave or arrive), and an alias moved back is a rollback by the same path.
A deployment that fails is reported and tried again with backoff; the target's
previous deployment keeps serving meanwhile (both targets deploy side by side and
switch only once the new one runs).

A guarded rollout of version N over the version M serving goes through phases:

  pre-flight  N loads as a cold start loads it and answers its reference rides as training recorded
  shadow      N answers every live ride beside M in the shadow deployment (riders see only M);
              the paired figures (rollout.analysis) must stay within rollout.settings.AnalysisSettings
  switch      riders move to N; `previous` names M
  bake        M answers the same rides in shadow while N answers riders; a breach sends riders back to M
  serving     N's page says how it got there

A failure at any phase leaves riders on M (or sends them back) and the alias back on M; N is
tagged ``rollout_status=blocked`` with the reason and the figures. Each phase is written to N's
version tags before it starts (``rollout_phase``, its start, M, the attempts, the figures), so a
controller restarted mid-rollout resumes the phase where it was, on the same clock. A version that
has served this alias before (a rollback) skips shadow and bake: it is known good; its pre-flight
still runs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from rollout.settings import AnalysisSettings

log = logging.getLogger("rollout")


@dataclass(frozen=True)
class Deployment:
    """A model version as deployed: what a target serves, or what the registry calls for."""

    version: str
    run_id: str
    artifact_uri: str = ""
    deployed_at: float | None = None  # when the target started serving it (Unix seconds), if it says


class Target(Protocol):
    name: str  # e.g. "function predict-duration (Cloud Functions)"

    def serving(self) -> Deployment | None:
        """What the target serves now (None: nothing is deployed yet)."""

    def deploy(self, model: Deployment) -> None:
        """Serve ``model``; raise if it does not serve it, leaving the previous deployment serving."""


class Superseded(Exception):
    """The phase cannot go on here: the alias moved on, or the controller is stopping (the phase then resumes)."""


class NotEvaluated(Exception):
    """A check could not be evaluated (the model store unreachable, a storage blip, a pre-flight timeout):
    retried with backoff, never a block. Distinct from a check evaluated that failed, which blocks."""


class RevisionNotReady(RuntimeError):
    """A deployment failed deterministically (its revision failed readiness): trying again cannot help, so the
    version is blocked at once, and no new revision is made for it."""


class _Blocked(Exception):
    """Raised inside a pass: the version is blocked (the failure budget is spent, or the failure is deterministic)."""

    def __init__(self, phase: str, reason: str, figures: dict[str, Any]):
        super().__init__(reason)
        self.phase, self.reason, self.figures = phase, reason, figures


class MemoryStory:
    """A rollout's durable state and its story kept in memory: for rollouts that need neither (tests, the challenger).

    The production controller uses rollout.app.RegistryStory: the same calls, on the version's tags and page."""

    def __init__(self):
        self.tags: dict[str, dict[str, str]] = {}
        self.pages: dict[str, list[str]] = {}
        self.aliases: dict[str, str] = {}

    def state(self, version: str) -> dict[str, str]:
        return dict(self.tags.get(version, {}))

    def mark(self, version: str, **tags: str) -> None:
        self.tags.setdefault(version, {}).update(tags)

    def tell(self, version: str, paragraph: str, **tags: str) -> None:
        self.pages.setdefault(version, []).append(paragraph)
        self.mark(version, **tags)

    def history(self, version: str) -> list[str]:
        return list(self.pages.get(version, []))

    def move_alias(self, alias: str, version: str) -> None:
        self.aliases[alias] = version


class _Fenced:
    """A target or story whose acts (``acts``) first check that this controller still holds the lease."""

    def __init__(self, inner: Any, check: Callable[[], None], acts: tuple[str, ...]):
        self._inner, self._check, self._acts = inner, check, acts

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name not in self._acts:
            return value

        def act(*args: Any, **kwargs: Any) -> Any:
            self._check()
            return value(*args, **kwargs)

        return act


TARGET_ACTS = ("deploy", "retire")
STORY_ACTS = ("mark", "tell", "move_alias")


class ShadowSlot:
    """The shadow deployment, lent to a production rollout for its shadow and bake phases. The challenger
    alias's rollout, which otherwise drives it, waits meanwhile and is asked to look again afterwards."""

    def __init__(self):
        self.holder: str | None = None
        self.waiting: list[Rollout] = []

    def lend(self, holder: str) -> None:
        self.holder = holder

    def give_back(self) -> None:
        if self.holder is None:
            return
        self.holder = None
        for rollout in self.waiting:
            rollout.request("the shadow deployment is free again")


@dataclass
class Guard:
    """What a guarded (production) rollout is given beyond its target."""

    shadow: Target  # the shadow deployment: answers every ride, riders never see it
    answers: Any  # rollout.analysis.LiveAnswers (or a test's), read by version and ride
    analysis: AnalysisSettings
    slot: ShadowSlot


def _figures(window: tuple, settings: AnalysisSettings, interval: bool) -> dict[str, Any]:
    """rollout.analysis.figures: cheap (no bootstrap) while watching, with the RMSE interval once at the decision."""
    from rollout.analysis import figures

    return figures(*window, settings=settings, interval=interval)


def rmse_gate(figs: dict[str, Any], settings: AnalysisSettings) -> str:
    """Which evidence a decision had: whether the paired RMSE gate could apply, on how many outcomes."""
    outcomes = int(figs.get("outcomes") or 0)
    if figs.get("rmse_diff_ci95"):
        return f"RMSE gate: applied on {outcomes} outcomes"
    return f"RMSE gate: not applied, {outcomes} outcomes of {settings.min_outcomes} needed"


# How rides end, for the expected length of a rollout: NYC yellow-cab durations are close to log-normal,
# median about 12 min, 95th percentile about 40 min (sigma = ln(40/12) / 1.645), within the contract's 1-60 min.
RIDE_MEDIAN_MINUTES, RIDE_LOG_SIGMA = 12.0, 0.73


def _ride_ended_share(minutes: float) -> float:
    """The share of rides that have ended ``minutes`` after their pickup (the log-normal CDF, clipped at 1-60 min)."""
    import math

    if minutes < 1:
        return 0.0
    if minutes >= 60:
        return 1.0
    return 0.5 * (1 + math.erf(math.log(minutes / RIDE_MEDIAN_MINUTES) / (RIDE_LOG_SIGMA * math.sqrt(2))))


def expected_rollout_minutes(settings: AnalysisSettings, rides_per_second: float) -> dict[str, Any]:
    """How long a guarded rollout takes at a steady ``rides_per_second``, from the settings: the shadow closes
    once it has ``shadow_min_rides`` rides and ``min_outcomes`` outcomes (a ride's outcome returns when it
    ends), or at ``shadow_max_minutes``; the bake lasts ``bake_minutes`` and until ``bake_min_rides``, at most
    ``bake_max_minutes``. Pre-flight and the deploys (seconds to a minute) are not counted.
    docs/rollout-controller.md shows it at 1, 10 and 100 rides/s."""
    step = 1 / 6  # minutes: a ten-second grid

    def outcomes_by(minutes: float) -> float:  # rides begun since the window opened that have ended
        grid = [i * step for i in range(int(minutes / step) + 1)]
        return rides_per_second * 60 * step * sum(_ride_ended_share(minutes - t) for t in grid)

    settle = (WINDOW_SETTLE_SECONDS + settings.answer_grace_seconds) / 60
    rides_minutes = settings.shadow_min_rides / rides_per_second / 60 + settle
    shadow = settings.shadow_max_minutes
    minute = max(rides_minutes, settle)
    while minute < settings.shadow_max_minutes:
        if minute >= rides_minutes and outcomes_by(minute - settle) >= settings.min_outcomes:
            shadow = minute
            break
        minute += step
    outcomes = int(outcomes_by(max(0.0, shadow - settle)))
    bake_rides_minutes = settings.bake_min_rides / rides_per_second / 60 + settle
    bake = min(max(settings.bake_minutes, bake_rides_minutes), settings.bake_max_minutes)
    return {
        "rides_per_second": rides_per_second,
        "shadow_minutes": round(shadow, 1),
        "shadow_outcomes": outcomes,
        "rmse_gate_in_shadow": outcomes >= settings.min_outcomes,
        "shadow_enough_rides": rides_minutes <= settings.shadow_max_minutes,
        "bake_minutes": round(bake, 1),
        "bake_enough_rides": bake_rides_minutes <= settings.bake_max_minutes,
        "total_minutes": round(shadow + bake, 1),
    }


# Rides in flight when a deployment starts to answer in shadow reach only the other one; the
# analysis window opens this long after the deployment serves (a ride takes well under a second).
WINDOW_SETTLE_SECONDS = 2.0


def _seconds(since: float) -> float:
    return round(time.time() - since, 2)


class Rollout:
    """One worker thread per (alias, target): rollouts never overlap, and each ends on the alias's latest version."""

    def __init__(
        self,
        alias: str,
        resolve: Callable[[str], Deployment | None],
        target: Target,
        retry_initial_seconds: float = 2.0,
        retry_max_seconds: float = 60.0,
        before_switch: Callable[[Deployment | None, Deployment], None] | None = None,
        resync_seconds: float = 60.0,
        preflight: Callable[[Deployment], Any] | None = None,
        story: Any = None,
        guard: Guard | None = None,
        slot: ShadowSlot | None = None,
        deploy_attempts: int = 3,
        lease: Any = None,
    ):
        self.alias = alias
        # Told (what serves now, what is about to replace it) before each deploy: production marks the
        # version really serving as `previous`, so a rollback after a failed rollout goes back one step.
        self._before_switch = before_switch
        self.resync_seconds = resync_seconds
        # Before a version is deployed, it must pass this (rollout.preflight.run: .passed, .reason).
        self._preflight = preflight
        # The rollout's durable state and its story (MemoryStory's calls): rollout.app.RegistryStory
        # keeps both on the version's tags and page in the registry.
        self._story = story if story is not None else MemoryStory()
        # A deploy of a version that fails this many times (or once, deterministically) blocks it.
        self.deploy_attempts = deploy_attempts
        # rollout.lease.RedisLease (held(), check()): without it this controller is the only one. Every act
        # (a deploy, an alias move, a tag write) first checks the lease is still held, with margin.
        self._lease = lease
        if lease is not None:
            self._story = _Fenced(self._story, lease.check, STORY_ACTS)
            target = _Fenced(target, lease.check, TARGET_ACTS)
            if guard is not None:
                guard = Guard(_Fenced(guard.shadow, lease.check, TARGET_ACTS), guard.answers, guard.analysis, guard.slot)
        self._guard = guard
        # A rollout of the shadow deployment itself (the challenger) waits while a guarded rollout holds it.
        self._slot = slot
        if slot is not None:
            slot.waiting.append(self)
        self._resolve = resolve
        self.target = target
        self._retry_initial, self._retry_max = retry_initial_seconds, retry_max_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.failures = 0
        self.last_error: str | None = None
        self.retry_at: float | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=20)
        self.phase: dict[str, Any] | None = None  # the guarded rollout under way: version, phase, since, figures

    # --- driving it ---------------------------------------------------------------------------
    def request(self, reason: str) -> None:
        """Look at the registry again soon; requests that arrive meanwhile fold into one look."""
        log.info("%s: rollout requested (%s)", self.alias, reason)
        self._idle.clear()
        self._wake.set()

    def start(self) -> Rollout:
        self._thread = threading.Thread(target=self._run, name=f"rollout-{self.alias}", daemon=True)
        self._thread.start()
        self.request("start")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def wait_idle(self, timeout: float) -> bool:
        """True once every request so far has been handled and the last attempt succeeded (tests, the CLI)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self.resync_seconds if self.retry_at is None else max(0.0, self.retry_at - time.time())
            self._wake.wait(min(delay, self.resync_seconds))  # woken by a webhook, a retry, or the resync
            if self._stop.is_set():
                return
            if self._lease is not None and not self._lease.held():
                # Another controller acts (or none yet): this one waits; the lease's keeper requests a look once held.
                self._wake.wait(1.0)
                continue
            self._wake.clear()
            try:
                self.reconcile()
            except Superseded:
                continue
            except NotEvaluated as exc:  # could not be evaluated: tried again with backoff, nothing blocked
                self._failed(exc, "could not evaluate")
                continue
            except Exception as exc:  # reported and retried; the previous deployment keeps serving
                self._failed(exc, "rollout failed")
                continue
            self.failures, self.last_error, self.retry_at = 0, None, None
            if not self._wake.is_set():
                self._idle.set()

    def _failed(self, exc: Exception, what: str) -> None:
        self.failures += 1
        backoff = min(self._retry_initial * 2 ** (self.failures - 1), self._retry_max)
        self.retry_at = time.time() + backoff
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error(
            "%s: %s, retrying in %.0f s; the previous deployment keeps serving: %s", self.alias, what, backoff, self.last_error
        )

    # --- one pass -----------------------------------------------------------------------------
    def reconcile(self) -> str:
        """Deploy what the alias points at, if the target serves anything else; says what it did."""
        try:
            return self._reconcile()
        finally:  # a guarded rollout holds the shadow deployment until its pass ends, however it ends
            if self._guard is not None:
                self._guard.slot.give_back()

    def _reconcile(self) -> str:
        with self._lock:
            if self._slot is not None and self._slot.holder not in (None, self.alias):
                return self._record("waiting", f"the shadow deployment is lent to the {self._slot.holder} rollout", None, None)
            wanted = self._resolve(self.alias)
            serving = self.target.serving()
            if wanted is None:
                if self._slot is not None and serving is not None and hasattr(self.target, "retire"):
                    # The shadow deployment with nothing wanted there (what a production rollout left in it,
                    # or a challenger alias deleted): it stops answering rather than serve an unnamed version.
                    self.target.retire()
                    return self._record("retired", f"no {self.alias!r} alias: v{serving.version} no longer in shadow", None, None)
                return self._record("no-op", f"the registry has no {self.alias!r} alias; nothing to roll out", serving, None)
            state = self._story.state(wanted.version)
            if _same(serving, wanted) and state.get("rollout_status") == "blocked" and state.get("rollout_from_deployment"):
                # Blocked during its bake and recorded, but the alias or riders not yet back (the controller
                # stopped, or the registry failed, between the record and the acts): finish the rollback.
                return self._finish_rollback(wanted, state)
            if _same(serving, wanted):
                # Riders are on it but its bake did not end (a controller stopped after the switch): bake it.
                unbaked = state.get("rollout_phase") == "bake" or (
                    state.get("rollout_phase") == "switch" and state.get(f"rollout_served_{self.alias}") != "true"
                )
                if self._guard is not None and unbaked and state.get("rollout_from"):
                    return self._resumed_bake(wanted, state)
                return self._record("no-op", f"already serving v{wanted.version}", serving, wanted)
            if state.get("rollout_status") == "blocked":
                # Blocked stays blocked (delete the tag to try again): the alias goes back, nothing is re-run. With
                # nothing deployed yet (a first version that cannot start) there is nothing to go back to, and
                # trying again would make one more failing revision each pass.
                if serving is not None:
                    self._story.move_alias(self.alias, serving.version)
                return self._record(
                    "blocked", f"v{wanted.version} is blocked ({state.get('rollout_reason', '')[:200]})", serving, wanted
                )
            log.info(
                "rolling out",
                extra={
                    "alias": self.alias,
                    "version": wanted.version,
                    "run_id": wanted.run_id,
                    "from": asdict(serving) if serving else None,
                },
            )
            try:
                return self._roll_out(wanted, serving, state)
            except _Blocked as exc:
                return self._block(wanted, serving, exc.phase, exc.reason, exc.figures)
            except Superseded as exc:
                self._record("superseded", f"v{wanted.version}: {exc}", serving, wanted)
                self._wake.set()  # look again at once: the alias's latest version is what counts
                raise
            finally:
                self.phase = None

    def _roll_out(self, wanted: Deployment, serving: Deployment | None, state: dict[str, str]) -> str:
        started = time.time()
        attempts = int(state.get("rollout_attempts", "0")) + 1
        # Known good: it has served this alias before (a rollback): no shadow, no bake; pre-flight still runs.
        known_good = state.get(f"rollout_served_{self.alias}") == "true"
        guarded = self._guard is not None and serving is not None and not known_good
        resuming = state.get("rollout_from") == serving.version if serving else False
        phases: dict[str, Any] = {}

        # A controller restarted mid-shadow goes on with the shadow: its pre-flight passed already.
        resumed_shadow = resuming and state.get("rollout_phase") == "shadow" and "rollout_preflight_max_diff_minutes" in state
        if resumed_shadow:
            phases["preflight"] = {"passed": True, "resumed": True}
        else:
            self._enter(wanted, "preflight", serving, attempts)
        preflight_began = time.time()
        verdict = self._preflight(wanted) if self._preflight is not None and not resumed_shadow else None
        if verdict is not None:
            if not getattr(verdict, "evaluated", True):  # could not be evaluated: try again later, block nothing
                raise NotEvaluated(f"pre-flight of v{wanted.version} could not be evaluated: {verdict.reason}")
            phases["preflight"] = {
                "passed": verdict.passed,
                "max_diff_minutes": verdict.max_diff_minutes,
                "rides": verdict.rides,  # the reference rides it answered
                "out_of_bounds": verdict.out_of_bounds,  # raw answers outside the contract's bounds
                "seconds": _seconds(preflight_began),  # to its decision, its own process's start included
            }
            if not verdict.passed:
                return self._block(wanted, serving, "pre-flight", verdict.reason, phases["preflight"])
            self._story.tell(
                wanted.version,
                f"**Pre-flight passed** ({_now()}): {verdict.reason}, largest difference {verdict.max_diff_minutes} min.",
                rollout_preflight_max_diff_minutes=str(verdict.max_diff_minutes),
            )

        if guarded:
            assert self._guard is not None and serving is not None
            resumed = resuming and state.get("rollout_phase") == "shadow"
            self._enter(wanted, "shadow", serving, attempts)
            if resumed:  # what the stopped controller had read went with it: the window starts anew, with a new deadline
                self._story.tell(
                    wanted.version,
                    f"**Shadow analysis resumed** ({_now()}) by a restarted controller, attempt {attempts}: "
                    "its window starts anew.",
                )
            self._guard.slot.lend(self.alias)
            if not _same(self._guard.shadow.serving(), wanted):
                self._deploy_candidate(self._guard.shadow, wanted, state)
            since = self._window_opens(wanted)
            settings = self._guard.analysis
            figs, found = self._watch(
                wanted,
                serving,
                since,
                settings.shadow_min_rides,
                settings.min_outcomes,
                0.0,
                settings.shadow_max_minutes * 60,
                early=False,
            )
            phases["shadow"] = figs
            if found:
                return self._block(wanted, serving, "shadow analysis", "; ".join(found), figs)
            self._story.tell(
                wanted.version,
                f"**Shadow analysis passed** ({_now()}): {_describe(figs, wanted, serving)}.",
                rollout_shadow=json.dumps(figs),
                rollout_shadow_rmse_gate=figs["rmse_gate"],
            )

        if self._before_switch is not None and serving is not None:
            try:
                self._before_switch(serving, wanted)
            except Exception as exc:  # bookkeeping only: the rollout goes on
                log.warning("%s: before the switch: %s: %s", self.alias, type(exc).__name__, exc)
        self._enter(wanted, "switch", serving, attempts)
        # The alias may have moved on while pre-flight or the shadow ran: a version no longer wanted never
        # reaches riders (issue 33: v1, v2, v1, v2 within 0.36 s, and v1 answered riders for 15 s).
        self._still_wanted(wanted)
        self._deploy_candidate(self.target, wanted, state)
        self._back_if_moved_on(wanted, serving, guarded)
        now_serving = self.target.serving()
        if now_serving is None or now_serving.run_id != wanted.run_id:
            raise RuntimeError(f"{self.target.name} reports {now_serving} after deploying v{wanted.version}")
        switch_seconds = _seconds(started)

        if guarded:
            assert serving is not None
            outcome, phases["bake"] = self._bake(wanted, serving, attempts)
            if outcome is not None:
                return outcome
        replaced = f", replacing v{serving.version}" if serving else ""
        if serving is not None and serving.version != wanted.version:  # its page no longer says it serves
            self._story.mark(serving.version, rollout_status=f"replaced by v{wanted.version}", rollout_phase="replaced")
        gates = "; ".join(f"{phase}: {phases[phase]['rmse_gate']}" for phase in ("shadow", "bake") if phase in phases)
        self._story.tell(
            wanted.version,
            f"**Rolled out to {self.alias}** ({_now()}): riders on it {switch_seconds} s after the rollout began{replaced}"
            + ("; known good (it served before): shadow and bake skipped" if known_good else "")
            + (f"; {gates}" if gates else "")
            + ".",
            rollout_status=f"serving {self.alias}",
            rollout_phase="serving",
            rollout_seconds=str(switch_seconds),
            **{f"rollout_served_{self.alias}": "true"},
        )
        return self._record(
            "rolled out",
            f"v{wanted.version} serving after {switch_seconds} s"
            + (" (known good)" if known_good else "")
            + (f" ({gates})" if gates else ""),
            now_serving,
            wanted,
            switch_seconds,
            phases,
        )

    def _still_wanted(self, wanted: Deployment) -> None:
        """The alias, read again right before an act that puts ``wanted`` before riders: Superseded if it moved on."""
        now_wanted = self._resolve(self.alias)
        if not _same(now_wanted, wanted):
            self._story.mark(wanted.version, rollout_status="superseded", rollout_phase="superseded")
            raise Superseded(f"the alias moved to v{now_wanted.version if now_wanted else '-'} before the switch")

    def _back_if_moved_on(self, wanted: Deployment, serving: Deployment | None, guarded: bool) -> None:
        """The alias, read again once riders are on ``wanted``: if it moved on during the deploy, riders go back at
        once to what served before when the alias names it again, or when ``wanted`` was guarded (it has not
        baked); otherwise the next pass, at once, rolls out whatever the alias names now."""
        now_wanted = self._resolve(self.alias)
        if _same(now_wanted, wanted):
            return
        self._story.mark(wanted.version, rollout_status="superseded", rollout_phase="superseded")
        moved = f"v{now_wanted.version}" if now_wanted else "nothing"
        if serving is not None and (guarded or _same(now_wanted, serving)):
            self.target.deploy(serving)
            raise Superseded(f"the alias moved to {moved} during the switch: riders went back to v{serving.version}")
        raise Superseded(f"the alias moved to {moved} during the switch")

    def _deploy_candidate(self, target: Target, wanted: Deployment, state: dict[str, str]) -> None:
        """``target.deploy(wanted)`` within the failure budget: a deploy failed ``deploy_attempts`` times (counted on
        the version's tags, so across restarts), or once deterministically (its revision failed readiness), blocks
        the version; the caller's block moves the alias back to what serves. Anything else is retried with backoff."""
        try:
            target.deploy(wanted)
        except Superseded:
            raise
        except Exception as exc:
            failures = int(self._story.state(wanted.version).get("rollout_deploy_failures", "0")) + 1
            error = f"{type(exc).__name__}: {exc}"
            self._story.mark(wanted.version, rollout_deploy_failures=str(failures), rollout_last_deploy_error=error[:5000])
            if isinstance(exc, RevisionNotReady) or failures >= self.deploy_attempts:
                why = "its revision failed readiness" if isinstance(exc, RevisionNotReady) else f"{failures} deploys failed"
                raise _Blocked("deploy", f"{why} on {target.name}: {error[:2000]}", {"deploy_failures": failures}) from exc
            raise
        if state.get("rollout_deploy_failures", "0") != "0":
            self._story.mark(wanted.version, rollout_deploy_failures="0")

    def _bake(self, wanted: Deployment, previous: Deployment, attempts: int) -> tuple[str | None, dict[str, Any]]:
        """Riders on ``wanted``, ``previous`` answering in shadow; a breach sends riders back.
        (what it did, None if it passed; its figures). Its window always opens now: a bake resumed by a
        restarted controller starts anew (what the stopped one read went with it), and a bake that gathers too
        few rides within its time does not pass: riders go back, the version is blocked."""
        assert self._guard is not None
        self._enter(wanted, "bake", previous, attempts)
        self._guard.slot.lend(self.alias)
        if not _same(self._guard.shadow.serving(), previous):
            self._guard.shadow.deploy(previous)  # the version riders go back to, warm
        since = self._window_opens(wanted)
        settings = self._guard.analysis
        figs, found = self._watch(
            wanted,
            previous,
            since,
            settings.bake_min_rides,
            0,
            settings.bake_minutes * 60,
            settings.bake_max_minutes * 60,
            early=True,
        )
        if found:
            reason = "; ".join(found)
            # Recorded first: were the controller (or MLflow) to fail before riders are back, the next pass
            # finishes the rollback (_finish_rollback) instead of running the rollout again.
            self._story.tell(
                wanted.version,
                f"**Bake breached** ({_now()}): {reason}. Riders are going back to v{previous.version}.",
                rollout_status="blocked",
                rollout_phase="rolling back",
                rollout_reason=reason[:5000],
                rollout_figures=json.dumps(figs),
            )
            self._story.move_alias(self.alias, previous.version)
            rollback_started = time.time()
            self.target.deploy(previous)
            figs = {**figs, "rollback_seconds": _seconds(rollback_started)}
            return self._block(wanted, previous, "bake", reason, figs, rolled_back=True), figs
        self._story.tell(
            wanted.version,
            f"**Bake passed** ({_now()}): {_describe(figs, wanted, previous)}.",
            rollout_bake=json.dumps(figs),
            rollout_bake_rmse_gate=figs["rmse_gate"],
        )
        return None, figs

    def _finish_rollback(self, wanted: Deployment, state: dict[str, str]) -> str:
        previous = Deployment(**json.loads(state["rollout_from_deployment"]))
        self._story.move_alias(self.alias, previous.version)
        self.target.deploy(previous)
        reason = state.get("rollout_reason", "")
        return self._block(wanted, previous, state.get("rollout_phase", "bake"), reason, {}, rolled_back=True)

    def _resumed_bake(self, wanted: Deployment, state: dict[str, str]) -> str:
        """A controller restarted during the bake: the bake starts anew (never passes on the stopped one's clock)."""
        previous = Deployment(**json.loads(state["rollout_from_deployment"]))
        attempts = int(state.get("rollout_attempts", "1"))
        self._story.tell(wanted.version, f"**Bake resumed** ({_now()}) by a restarted controller: its window starts anew.")
        try:
            outcome, _ = self._bake(wanted, previous, attempts)
        finally:
            self.phase = None
        if outcome is not None:
            return outcome
        self._story.tell(
            wanted.version,
            f"**Rolled out to {self.alias}** ({_now()}): the bake resumed after a controller restart and passed.",
            rollout_status=f"serving {self.alias}",
            rollout_phase="serving",
            **{f"rollout_served_{self.alias}": "true"},
        )
        return self._record("rolled out", f"v{wanted.version} serving (bake resumed and passed)", wanted, wanted)

    def _window_opens(self, wanted: Deployment) -> float:
        """When the phase's window opens, now that both deployments answer: a little later, since rides
        published before the shadow's subscription existed reach one deployment only."""
        since = time.time() + WINDOW_SETTLE_SECONDS
        if self.phase is not None:
            self.phase["since"] = since
        self._story.mark(wanted.version, rollout_phase_started_at=str(since))
        return since

    def _watch(
        self,
        wanted: Deployment,
        serving: Deployment,
        since: float,
        min_rides: int,
        min_outcomes: int,
        min_seconds: float,
        max_seconds: float,
        early: bool,
    ) -> tuple[dict[str, Any], list[str]]:
        """The paired figures of ``wanted`` against ``serving`` from ``since`` until the window closes: once it has
        ``min_rides`` rides, ``min_outcomes`` outcomes and ``min_seconds``, or at ``max_seconds`` (then with too
        few rides it is a breach: no evidence is no pass; with too few outcomes it decides on what it has, and
        its figures' ``rmse_gate`` says so). ``early``: a breach acts at once (the bake)."""
        from rollout.analysis import answer_breaches, breaches

        assert self._guard is not None
        settings, last_look, last_saved = self._guard.analysis, 0.0, time.time()

        def decided(window: tuple, extra: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
            figs = {**_figures(window, settings, interval=True), "seconds": _seconds(since), "window_opened_at": round(since, 3)}
            figs["rmse_gate"] = rmse_gate(figs, settings)
            if self.phase is not None:
                self.phase["figures"] = figs
            return figs, [*(extra or []), *breaches(figs, settings)]

        while True:
            if self._stop.is_set():
                raise Superseded("the controller is stopping; the phase resumes when it starts again")
            if time.monotonic() - last_look > 2:  # the alias may have moved on meanwhile
                last_look = time.monotonic()
                now_wanted = self._resolve(self.alias)
                if not _same(now_wanted, wanted):
                    self._story.mark(wanted.version, rollout_status="superseded", rollout_phase="superseded")
                    raise Superseded(f"the alias moved to v{now_wanted.version if now_wanted else '-'}")
            window = self._guard.answers.window(serving.version, wanted.version, since, settings.answer_grace_seconds)
            figs = {
                **_figures(window, settings, interval=False),
                "seconds": _seconds(since),
                "window_opened_at": round(since, 3),
            }
            if self.phase is not None:
                self.phase["figures"] = figs
            enough_rides = figs["rides"] >= min_rides
            if enough_rides and figs["outcomes"] >= min_outcomes and figs["seconds"] >= min_seconds:
                return decided(window)
            if figs.get("paired", 0) >= min_rides and answer_breaches(figs, settings):
                # Its answers already out of bounds on its minimum of rides: outcomes can only add the RMSE gate's
                # breach, never take one away, so waiting for them would keep a broken version in shadow for nothing.
                return decided(window)
            if early and breaches(figs, settings) and figs["rides"] >= max(20, min_rides // 4):
                return decided(window)  # a breach during the bake acts at once
            if figs["seconds"] >= max_seconds:
                if enough_rides:  # outcomes short of min_outcomes: decided on what it has, and says so
                    return decided(window)
                return decided(
                    window,
                    [f"only {figs['rides']} rides answered by both versions in {figs['seconds']:.0f} s (needs {min_rides})"],
                )
            if time.time() - last_saved > 10:  # durable figures, for the page and a restarted controller's status
                last_saved = time.time()
                self._story.mark(wanted.version, rollout_figures=json.dumps(figs))
            self._wake.wait(0.5)
            self._wake.clear()

    def _enter(
        self, wanted: Deployment, phase: str, serving: Deployment | None, attempts: int, since: float | None = None
    ) -> None:
        """The phase, written to the version's tags before it starts: a restarted controller resumes from them."""
        since = time.time() if since is None else since
        self.phase = {"version": wanted.version, "phase": phase, "since": since, "from": serving.version if serving else None}
        log.info("%s: v%s %s", self.alias, wanted.version, phase)
        self._story.mark(
            wanted.version,
            rollout_status=f"rolling out to {self.alias}",
            rollout_phase=phase,
            rollout_phase_started_at=str(since),
            rollout_attempts=str(attempts),
            rollout_from=serving.version if serving else "",
            rollout_from_deployment=json.dumps(asdict(serving)) if serving else "",
        )

    def _block(
        self,
        wanted: Deployment,
        serving: Deployment | None,
        phase: str,
        reason: str,
        figs: dict[str, Any],
        rolled_back: bool = False,
    ) -> str:
        """Riders stay on (or went back to) ``serving``; the alias returns to it; the version says why."""
        kept = (
            f"Riders {'went back' if rolled_back else 'stayed'} on v{serving.version}, and the {self.alias} alias was moved back to it"
            if serving
            else "Nothing was deployed"
        )
        self._story.tell(
            wanted.version,
            f"**Rollout to {self.alias} blocked at {phase}** ({_now()}): {reason}. Figures: {json.dumps(figs)}. {kept}.",
            rollout_status="blocked",
            rollout_phase=phase,
            rollout_reason=reason[:5000],
            rollout_figures=json.dumps(figs),
        )
        if serving is not None and serving.version != wanted.version:
            self._story.move_alias(self.alias, serving.version)
        outcome = "rolled back" if rolled_back else "blocked"
        kept = f"v{serving.version} serves" if serving else "nothing is deployed"
        return self._record(outcome, f"v{wanted.version} blocked at {phase}: {reason}; {kept}", serving, wanted, figures=figs)

    def _record(
        self,
        outcome: str,
        message: str,
        serving: Deployment | None,
        wanted: Deployment | None,
        seconds: float | None = None,
        figures: dict[str, Any] | None = None,
    ) -> str:
        if outcome not in ("no-op", "waiting") or not self.history or self.history[-1]["message"] != message:
            self.history.append(
                {
                    "at": time.time(),
                    "outcome": outcome,
                    "message": message,
                    "version": wanted.version if wanted else None,
                    "seconds": seconds,
                    **({"figures": figures} if figures else {}),
                }
            )
        log.info("%s: %s", self.alias, message)
        return message

    def status(self) -> dict[str, Any]:
        """The registry's alias and what the target serves, side by side, whether they differ, and the phase under way."""
        wanted, serving, problem = None, None, None
        try:
            wanted = self._resolve(self.alias)
            serving = self.target.serving()
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        rolling_out = self._lock.locked()  # a pass is under way: not settled, whatever the target says yet
        in_sync = problem is None and not rolling_out and wanted is not None and _same(serving, wanted)
        state = "in sync" if in_sync else "rolling out" if rolling_out else "failing" if self.last_error else "out of sync"
        phase = dict(self.phase) if self.phase else None
        if phase:
            phase["seconds"] = _seconds(phase["since"])
        return {
            "alias": self.alias,
            "target": self.target.name,
            "registry": asdict(wanted) if wanted else None,
            "serving": asdict(serving) if serving else None,
            "in_sync": in_sync,
            "state": state,
            "phase": phase,
            "guarded": self._guard is not None,
            "problem": problem,
            "last_error": self.last_error,
            "failures": self.failures,
            "retry_in_seconds": round(self.retry_at - time.time(), 1) if self.retry_at else None,
            "resync_seconds": self.resync_seconds,
            "history": list(self.history)[-5:],
        }


def _same(serving: Deployment | None, wanted: Deployment | None) -> bool:
    return serving is not None and wanted is not None and serving.run_id == wanted.run_id and serving.version == wanted.version


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _describe(figs: dict[str, Any], wanted: Deployment, serving: Deployment) -> str:
    n, m = f"v{wanted.version}", f"v{serving.version}"
    text = (
        f"{figs.get('rides', 0)} live rides answered by {n} and {m} in {figs.get('seconds', 0):.0f} s: "
        f"median |{n} - {m}| {figs.get('median_abs_diff_minutes')} min, mean {n} - {m} {figs.get('mean_diff_minutes')} min, "
        f"{n}'s p95 answer {figs.get('p95_answer_ms')} ms, unanswered {figs.get('missing_rate')}, "
        f"extra dead letters {figs.get('extra_dead_letter_rate')}, extra out-of-bounds {figs.get('extra_clipped_rate')}"
    )
    if figs.get("rmse_diff_ci95"):
        text += f", RMSE {n} - {m} {figs['rmse_diff_minutes']} min (95 % CI {figs['rmse_diff_ci95']})"
    if figs.get("rmse_gate"):
        text += f"; {figs['rmse_gate']}"
    return text
