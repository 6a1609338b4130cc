"""Guarded rollouts on the real local stack, while riders keep coming: what each phase costs, what riders see.

``promote_under_traffic`` promotes a version as the MLflow UI does (the same REST call) while real
rides stream through the backends, waits for the controller to end the rollout, and says when
riders first got the new version, how many rides were lost and which versions answered riders.
The demo uses it; so do the controller's fault scenarios here (``ROLLOUT_SCENARIOS``), which
``tests/test_rollout_faults.py`` asserts on and ``benchmarks/rollout_bench.py`` prints.
"""

from __future__ import annotations

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
SCENARIO_ANALYSIS = {**DEMO_ANALYSIS, "ROLLOUT_BAKE_MINUTES": "0.05", "ROLLOUT_RESYNC_SECONDS": str(RESYNC_SECONDS)}
ENDED = ("rolled out", "blocked", "rolled back")


def promote_as_the_ui_does(stack: Stack, version: str, alias: str = "production") -> float:
    """The MLflow UI's REST call (POST /api/2.0/mlflow/registered-models/alias); the time it was made."""
    from mlflow import MlflowClient

    from training.settings import Settings

    at = time.time()
    MlflowClient(stack.urls["mlflow"]).set_registered_model_alias(Settings.from_env().model_name, alias, version)
    return at


def promote_under_traffic(
    stack: Stack, version: str, during=None, rate_waves: int = 8, report_outcomes: bool | OutcomeReporter = False
) -> tuple[list, dict[str, Any]]:
    """Promote ``version`` while riders keep coming, until the controller has ended the rollout.

    ``during(promoted_at)``: a fault to inject once the alias has moved (a killed controller, ...).
    Says when riders first got the version, whether any ride was lost, which versions answered
    riders, and the controller's record of the rollout, its phases and their figures. ``report_outcomes``:
    each ride's outcome goes back when it ends, on the reporter given (the caller drains it) or, with True,
    on one of its own, drained before returning."""
    if production_version(stack) == str(version):  # there would be nothing to roll out, and nothing to wait for
        raise RuntimeError(f"v{version} is production already: the scenario before did not end as it should")
    outcomes: list = []
    stop = threading.Event()
    # One reporter for every wave: a wave does not wait for its rides to end before the next one comes.
    reporter = OutcomeReporter() if report_outcomes is True else report_outcomes

    def riders() -> None:
        seed = 100
        while not stop.is_set():  # small waves of real rides, back to back, until told to stop
            rides = real_rides(rate_waves, seed=seed)
            outcomes.extend(stream(stack.backend_urls, rides, concurrency=4, report_outcomes=reporter))
            seed += 1

    traffic = threading.Thread(target=riders)
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
        if report_outcomes is True:
            reporter.close()
    answered_by_it = [o.answered_at for o in outcomes if o.model_version == str(version) and o.answered_at]
    summary = summarize(outcomes)
    record = entry["ended"]
    result = {
        "outcome": record["outcome"],
        "message": record["message"],
        "rides": len(outcomes),
        "lost": summary["lost"],
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
    backend, the controller (resync every RESYNC_SECONDS), and three versions of real models: v1
    serving, v2 retrained on other rides, v3 trained on shuffled durations."""

    def __init__(self, directory: Path, record_access: bool = True):
        # With the access recorder by default: these scenarios exercise every identity (tests/test_rollout_faults.py
        # compares what each touched with infra/'s grants).
        self.stack = Stack(directory, record_access=record_access)
        self.versions: dict[str, str] = {}

    def start(self) -> RolloutStack:
        from training.settings import Settings
        from training.train import TrainConfig, train

        stack = self.stack
        stack.start_emulators()
        stack.start_mlflow()
        stack.ensure_topology()
        stack.apply_env("training")  # this process trains the versions (and runs the flows), as training does
        stack.start_backends(1)
        stack.start_outcome_sink()
        stack.start_rollout(settings=SCENARIO_ANALYSIS)
        settings = Settings.from_env()  # the stack's registry (apply_env)
        configs = {
            "serving": TrainConfig(trials=1, sample=12_000),
            "retrained": TrainConfig(train_months=["2021-01", "2022-01"], trials=1, sample=12_000),
            "broken": TrainConfig(trials=1, sample=12_000, shuffle_targets=True),
        }
        self.versions = {name: train(config, settings).version for name, config in configs.items()}
        promote_as_the_ui_does(stack, self.versions["serving"])
        stack.wait_rolled_out("production", self.versions["serving"])
        return self

    def stop(self) -> list[str]:
        return self.stack.stop_all()

    def set_webhook(self, active: bool) -> None:
        """Stop (or resume) MLflow's deliveries to the controller, as a lost delivery would."""
        from mlflow import MlflowClient

        client = MlflowClient(self.stack.urls["mlflow"])
        for hook in client.list_webhooks():
            client.update_webhook(hook.webhook_id, status="ACTIVE" if active else "DISABLED")


def controller_killed_mid_rollout(rs: RolloutStack) -> dict[str, Any]:
    """kill -9 the controller in the shadow phase of a retrained version, start it again: it resumes the phase."""
    stack, version = rs.stack, rs.versions["retrained"]

    def kill_in_shadow(promoted_at: float) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the analysis has counted some rides: mid-phase
            phase = requests.get(f"{stack.urls['rollout']}/readyz", headers=stack.rollout_operator_headers(), timeout=10).json()[
                "aliases"
            ]["production"]["phase"]
            if phase and phase["phase"] == "shadow" and (phase.get("figures") or {}).get("rides"):
                break
            time.sleep(0.2)
        began = version_tags(stack, version).get("rollout_phase_started_at")
        pid = stack.pids["rollout"]
        os.killpg(os.getpgid(pid), signal.SIGKILL)  # no goodbye: whatever it held in memory is gone
        while pid_alive(pid):
            time.sleep(0.05)
        killed_at = time.time()
        stack.restart("rollout")
        return {"killed_in": "shadow", "shadow_began_at": began, "restarted_after_seconds": round(time.time() - killed_at, 2)}

    _, result = promote_under_traffic(stack, version, during=kill_in_shadow)
    tags = version_tags(stack, version)
    result["attempts"] = tags.get("rollout_attempts")
    result["phase_tags"] = {k: tags.get(k) for k in ("rollout_status", "rollout_phase")}
    return result


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


# In this order, on one stack: v2 reaches riders through a controller killed mid-shadow; the broken
# v3 is blocked (riders stay on v2); a rollback to v1 (known good) whose webhook MLflow never
# delivers, by the resync alone.
ROLLOUT_SCENARIOS = {
    "controller-killed": controller_killed_mid_rollout,
    "broken-blocked": broken_version_blocked,
    "webhook-dropped": webhook_dropped,
}
