"""Guarded rollouts on the real local stack, while riders keep coming: what each phase costs, what riders see.

``promote_under_traffic`` promotes a version as the MLflow UI does (the same REST call) while real
rides stream through the backends, waits for the controller to end the rollout, and says when
riders first got the new version, how many rides were lost and which versions answered riders.
The demo uses it; so do the controller's fault scenarios here (``ROLLOUT_SCENARIOS``), which
``tests/test_rollout_faults.py`` asserts on and ``benchmarks/rollout_bench.py`` prints.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import requests

from devstack.processes import pid_alive
from devstack.stack import DEMO_ANALYSIS, Stack
from devstack.traffic import OutcomeReporter, real_rides, stream, summarize

# The controller's resync in these scenarios: a missed webhook must be corrected within it plus a deploy.
RESYNC_SECONDS = 5
# A missed webhook is noticed within the resync period (plus the polling of who watches); then the rollout runs.
NOTICE_BOUND_SECONDS = RESYNC_SECONDS + 2
# The scenarios' analysis windows: the demo's, with a shorter bake (the scenarios judge what happens, not how long).
# Its bake lasts 15 s: long enough for a fault to land in it (a controller killed mid-bake).
SCENARIO_ANALYSIS = {**DEMO_ANALYSIS, "ROLLOUT_BAKE_MINUTES": "0.25", "ROLLOUT_RESYNC_SECONDS": str(RESYNC_SECONDS)}
# Pub/Sub answering nothing for this long, mid-shadow; two controllers side by side this long, mid-shadow.
PUBSUB_OUTAGE_SECONDS = 60
OVERLAP_SECONDS = 8
ENDED = ("rolled out", "blocked", "rolled back")


def promote_as_the_ui_does(stack: Stack, version: str, alias: str = "production") -> float:
    """The MLflow UI's REST call (POST /api/2.0/mlflow/registered-models/alias); the time it was made."""
    from mlflow import MlflowClient

    from training.settings import Settings

    at = time.time()
    MlflowClient(stack.urls["mlflow"]).set_registered_model_alias(Settings.from_env().model_name, alias, version)
    return at


def promote_under_traffic(
    stack: Stack,
    version: str,
    during=None,
    rate_waves: int = 8,
    report_outcomes: bool | OutcomeReporter = False,
    final_timeout: float = 30,
    rides_per_second: float | None = None,
) -> tuple[list, dict[str, Any]]:
    """Promote ``version`` while riders keep coming, until the controller has ended the rollout.

    ``during(promoted_at)``: a fault to inject once the alias has moved (a killed controller, ...).
    Says when riders first got the version, whether any ride was lost, which versions answered
    riders, and the controller's record of the rollout, its phases and their figures. ``report_outcomes``:
    each ride's outcome goes back when it ends, on the reporter given (the caller drains it) or, with True,
    on one of its own, drained before returning. ``final_timeout``: how long a rider waits for its final (a ride
    not answered by then is lost). ``rides_per_second``: riders come at this pace (waves of ``rate_waves`` rides
    started on time), not as fast as the stack answers them."""
    if production_version(stack) == str(version):  # there would be nothing to roll out, and nothing to wait for
        raise RuntimeError(f"v{version} is production already: the scenario before did not end as it should")
    outcomes: list = []
    stop = threading.Event()
    # One reporter for every wave: a wave does not wait for its rides to end before the next one comes.
    reporter = OutcomeReporter() if report_outcomes is True else report_outcomes

    def riders() -> None:
        seed, sent = 100, 0
        while not stop.is_set():  # small waves of real rides, back to back (or paced), until told to stop
            rides = real_rides(rate_waves, seed=seed)
            outcomes.extend(
                stream(stack.backend_urls, rides, concurrency=4, final_timeout=final_timeout, report_outcomes=reporter)
            )
            seed, sent = seed + 1, sent + len(rides)
            if rides_per_second:
                stop.wait(traffic_began + sent / rides_per_second - time.monotonic())

    traffic = threading.Thread(target=riders)
    traffic_began = time.monotonic()
    traffic.start()
    notes: dict[str, Any] = {}
    try:
        time.sleep(1.5)  # riders are being answered by the version serving
        promoted_at = promote_as_the_ui_does(stack, version)
        if during is not None:
            notes = during(promoted_at) or {}
        entry = stack.wait_rollout_ended("production", version, promoted_at)
        ended_at = time.time()
        time.sleep(1.5)  # rides in flight at the end are answered too
    finally:
        stop.set()
        traffic.join()
        traffic_seconds = time.monotonic() - traffic_began
        if report_outcomes is True:
            reporter.close()
    answered_by_it = [o.answered_at for o in outcomes if o.model_version == str(version) and o.answered_at]
    summary = summarize(outcomes)
    record = entry["ended"]
    result = {
        "outcome": record["outcome"],
        "message": record["message"],
        "rides": len(outcomes),
        "rides_per_second": round(len(outcomes) / traffic_seconds, 2),
        "lost": summary["lost"],
        # Which rides were lost and why (the first five): their ride ids lead to the stack's logs.
        "lost_rides": [(o.ride_id, o.error) for o in outcomes if o.duration_final is None][:5],
        "riders_answered_by_it": len(answered_by_it),
        "model_versions_seen": summary["model_versions"],
        "seconds_from_alias_set_to_riders_on_it": round(min(answered_by_it) - promoted_at, 2) if answered_by_it else None,
        "seconds_from_alias_set_to_rollout_ended": round(ended_at - promoted_at, 2),
        "rollout_seconds": record.get("seconds"),  # the controller's own time, from its first look
        "phases": record.get("figures") or {},
        **notes,
    }
    return outcomes, result


def version_tags(stack: Stack, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    from training.settings import Settings

    tags = MlflowClient(stack.urls["mlflow"]).get_model_version(Settings.from_env().model_name, version).tags
    return {k: v for k, v in tags.items() if k.startswith("rollout_")}


def production_version(stack: Stack) -> str:
    from training import registry
    from training.settings import Settings

    return registry.current_version(registry.PRODUCTION, Settings.from_env())


class RolloutStack:
    """The scenarios' stack: emulators, an MLflow server, the function and its shadow deployment, one
    backend, the controller (resync every RESYNC_SECONDS), and five versions of real models: v1
    serving, v2 retrained on other rides, v3 trained on shuffled durations, v4 and v5 v1's recipe again."""

    def __init__(self, directory: Path, record_access: bool = True):
        # With the access recorder by default: these scenarios exercise every identity (tests/test_rollout_faults.py
        # compares what each touched with infra/'s grants).
        self.stack = Stack(directory, record_access=record_access)
        self.versions: dict[str, str] = {}

    def version_configs(self) -> dict:
        """The versions trained at start, by name (training.train.TrainConfig each); "serving" is promoted first."""
        from training.train import TrainConfig

        return {
            "serving": TrainConfig(trials=1, sample=12_000),
            "retrained": TrainConfig(train_months=["2021-01", "2022-01"], trials=1, sample=12_000),
            "broken": TrainConfig(trials=1, sample=12_000, shuffle_targets=True),
            # The serving version's recipe run again, twice: new versions that answer as it does (the faults of
            # the last two scenarios, not the versions, are what they judge).
            "retrained-again": TrainConfig(trials=1, sample=12_000),
            "retrained-once-more": TrainConfig(trials=1, sample=12_000),
        }

    def start(self) -> RolloutStack:
        stack = self.stack
        stack.start_emulators()
        stack.start_mlflow()
        stack.ensure_topology()
        stack.apply_env("training")  # this process trains the versions (and runs the flows), as training does
        stack.start_backends(1)
        stack.start_outcome_sink()
        stack.start_rollout(settings=SCENARIO_ANALYSIS)
        for name, config in self.version_configs().items():
            self.train(name, config)
        promote_as_the_ui_does(stack, self.versions["serving"])
        stack.wait_rolled_out("production", self.versions["serving"])
        return self

    def train(self, name: str, config) -> str:
        """A new version of a real model on the stack's registry (``config``: a training.train.TrainConfig)."""
        from training.settings import Settings
        from training.train import train

        self.versions[name] = train(config, Settings.from_env()).version
        return self.versions[name]

    def stop(self) -> list[str]:
        return self.stack.stop_all()

    def set_webhook(self, active: bool) -> None:
        """Stop (or resume) MLflow's deliveries to the controller, as a lost delivery would."""
        from mlflow import MlflowClient

        client = MlflowClient(self.stack.urls["mlflow"])
        for hook in client.list_webhooks():
            client.update_webhook(hook.webhook_id, status="ACTIVE" if active else "DISABLED")


def operator_view(stack: Stack, path: str = "/readyz", key: str = "rollout") -> dict[str, Any]:
    """The controller's answer as its operator sees it (figures, lease), not the public one."""
    return requests.get(f"{stack.urls[key]}{path}", headers=stack.rollout_operator_headers(), timeout=10).json()


def wait_for_phase(stack: Stack, phase: str, timeout: float = 120) -> None:
    """Until production's rollout is in ``phase`` and its analysis has counted some rides: mid-phase."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = operator_view(stack)["aliases"]["production"]["phase"]
        if current and current["phase"] == phase and (current.get("figures") or {}).get("rides"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"production's rollout was not in {phase} with rides counted within {timeout:.0f} s")


def kill_controller(stack: Stack) -> float:
    """kill -9 the controller (no goodbye: what it held in memory is gone, its lease runs out by itself) and
    start it again as it was; when it died."""
    pid = stack.pids["rollout"]
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.05)
    killed_at = time.time()
    stack.restart("rollout")
    return killed_at


def phase_figures(stack: Stack, version: str) -> dict[str, Any]:
    """The figures each passed phase of ``version`` recorded on its tags (the shadow's, the bake's)."""
    tags = version_tags(stack, version)
    return {phase: json.loads(tags[f"rollout_{phase}"]) for phase in ("shadow", "bake") if tags.get(f"rollout_{phase}")}


def controller_killed_mid_rollout(rs: RolloutStack) -> dict[str, Any]:
    """kill -9 the controller in the shadow phase of a retrained version and start it again, then the same in its
    bake: each resumed phase opens a window of its own (what the killed controller had read is gone) and passes
    on rides it read itself, never on fewer than its minimum."""
    stack, version = rs.stack, rs.versions["retrained"]

    def kill_in_shadow_then_in_bake(promoted_at: float) -> dict[str, Any]:
        wait_for_phase(stack, "shadow")
        began = version_tags(stack, version).get("rollout_phase_started_at")
        killed_in_shadow_at = kill_controller(stack)
        wait_for_phase(stack, "bake")
        killed_in_bake_at = kill_controller(stack)
        return {"shadow_began_at": began, "killed_in_shadow_at": killed_in_shadow_at, "killed_in_bake_at": killed_in_bake_at}

    _, result = promote_under_traffic(stack, version, during=kill_in_shadow_then_in_bake, report_outcomes=True)
    tags = version_tags(stack, version)
    result["attempts"] = tags.get("rollout_attempts")
    result["phase_tags"] = {k: tags.get(k) for k in ("rollout_status", "rollout_phase")}
    result["recorded"] = phase_figures(stack, version)
    return result


def pubsub_unavailable_mid_shadow(rs: RolloutStack) -> dict[str, Any]:
    """Pub/Sub answers nothing for a minute (the emulator frozen: nothing lost, nothing delivered, every call
    hangs) in the shadow of a retrained version: riders wait and get their finals after, the shadow goes on
    with what it reads once the stream is back, and a good version still reaches riders."""
    stack, version = rs.stack, rs.versions["retrained-again"]

    def freeze_pubsub(promoted_at: float) -> dict[str, Any]:
        wait_for_phase(stack, "shadow")
        group = os.getpgid(stack.pids["pubsub"])
        frozen_at = time.time()
        os.killpg(group, signal.SIGSTOP)
        try:
            time.sleep(PUBSUB_OUTAGE_SECONDS)
        finally:
            os.killpg(group, signal.SIGCONT)
        return {"pubsub_frozen_at": frozen_at, "pubsub_frozen_seconds": PUBSUB_OUTAGE_SECONDS}

    # Riders wait out the outage: a final comes within the outage and the backends' resend after it.
    _, result = promote_under_traffic(
        stack, version, during=freeze_pubsub, report_outcomes=True, final_timeout=PUBSUB_OUTAGE_SECONDS + 90
    )
    result["recorded"] = phase_figures(stack, version)
    return result


def controller_deployed_over_itself(rs: RolloutStack) -> dict[str, Any]:
    """A deploy of the controller mid-shadow, as Cloud Run makes it: the new revision's instance starts beside the
    old one (both up, both asked, one lease), then the old one gets SIGTERM. Never both act; the new one takes the
    lease when the old one lets it go, resumes the rollout and ends it."""
    stack, version = rs.stack, rs.versions["retrained-once-more"]

    def deploy_over_itself(promoted_at: float) -> dict[str, Any]:
        wait_for_phase(stack, "shadow")
        stack.start_rollout(settings=SCENARIO_ANALYSIS, key="rollout-next", webhook=False)
        holders: list[tuple[bool, bool]] = []
        overlap_until = time.monotonic() + OVERLAP_SECONDS
        while time.monotonic() < overlap_until:  # both running: who holds the lease, as each says
            holders.append(tuple(operator_view(stack, "/status", key)["lease"]["held"] for key in ("rollout", "rollout-next")))
            time.sleep(0.25)
        stack.stop("rollout")  # Cloud Run retires the old revision's instance: SIGTERM, its lease released
        stack.rename("rollout-next", "rollout")
        return {
            "overlap_samples": len(holders),
            "both_held": sum(1 for old, new in holders if old and new),
            "old_held_throughout": all(old and not new for old, new in holders),
        }

    _, result = promote_under_traffic(stack, version, during=deploy_over_itself, report_outcomes=True)
    result["lease_after"] = operator_view(stack, "/status")["lease"]
    result["recorded"] = phase_figures(stack, version)
    return result


def rollout_at_rate(rs: RolloutStack, name: str, rides_per_second: float) -> dict[str, Any]:
    """A new version of the serving version's recipe (trained here as ``name``) promoted while riders come at
    ``rides_per_second`` and report their outcomes when their rides end: each phase's time to its decision and
    the evidence it had (rides, outcomes, whether the RMSE gate applied), as the controller recorded them."""
    from training.train import TrainConfig

    version = rs.train(name, TrainConfig(trials=1, sample=12_000))
    _, result = promote_under_traffic(rs.stack, version, report_outcomes=True, rides_per_second=rides_per_second)
    evidence = (
        *("rides", "outcomes", "rmse_gate", "rmse_diff_minutes", "rmse_diff_ci95", "median_abs_diff_minutes"),
        *("out_of_bounds", "max_diff_minutes"),  # pre-flight's
    )
    return {
        "outcome": result["outcome"],
        "rides_per_second": result["rides_per_second"],
        "lost": result["lost"],
        "seconds_from_alias_set_to_rollout_ended": result["seconds_from_alias_set_to_rollout_ended"],
        "phases": {
            phase: {"seconds_to_decision": figs.get("seconds"), **{k: figs[k] for k in evidence if k in figs}}
            for phase, figs in result["phases"].items()
        },
    }


def webhook_dropped(rs: RolloutStack) -> dict[str, Any]:
    """A rollback (to v1, which served before) whose webhook MLflow never delivers: the resync alone rolls it out."""
    stack = rs.stack
    rs.set_webhook(active=False)
    try:
        _, result = promote_under_traffic(stack, rs.versions["serving"])
    finally:
        rs.set_webhook(active=True)
    result["resync_seconds"] = RESYNC_SECONDS
    return result


def broken_version_blocked(rs: RolloutStack) -> dict[str, Any]:
    """A version trained on shuffled durations: it passes pre-flight, the shadow analysis blocks it."""
    stack, version = rs.stack, rs.versions["broken"]
    before = production_version(stack)
    _, result = promote_under_traffic(stack, version)
    result["alias_back_on"] = production_version(stack)
    result["serving_before"] = before
    result["tags"] = {
        k: v[:300] for k, v in version_tags(stack, version).items() if k in ("rollout_status", "rollout_phase", "rollout_reason")
    }
    return result


# In this order, on one stack: v2 reaches riders through a controller killed mid-shadow and again mid-bake; the
# broken v3 is blocked (riders stay on v2); a rollback to v1 (known good) whose webhook MLflow never delivers, by
# the resync alone; v4 through a minute with Pub/Sub down mid-shadow; v5 through a deploy of the controller over
# itself.
ROLLOUT_SCENARIOS = {
    "controller-killed": controller_killed_mid_rollout,
    "broken-blocked": broken_version_blocked,
    "webhook-dropped": webhook_dropped,
    "pubsub-unavailable": pubsub_unavailable_mid_shadow,
    "deployed-over-itself": controller_deployed_over_itself,
}
