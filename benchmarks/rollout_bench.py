"""The guarded rollout on the real local stack, per phase, while riders keep coming.

    python benchmarks/rollout_bench.py

Runs devstack/rollouts.py's scenarios in order on one stack: a retrained version promoted as
the UI does, with the controller killed mid-shadow and again mid-bake; a version trained on
shuffled durations; a rollback to the version before whose webhook never arrives; Pub/Sub frozen
for a minute mid-shadow; the controller deployed over itself mid-shadow.
Prints one JSON document on stdout (logs to stderr), each figure beside its target:

- seconds from the alias moving to riders on the new version;
- rides lost in each rollout (target 0);
- riders answered by a blocked version (target 0);
- seconds to converge after a missed webhook (target: the resync period plus the rollout);
- seconds for a rollback;
- the phases' own figures (pre-flight, shadow and bake: rides, median |N - M|, p95 answer, ...);
- then, at two traffic rates (TRAFFIC_RATES), a good version's rollout while riders report their outcomes when
  their rides end: per phase, its time to decision and the evidence it had (rides, outcomes, the RMSE gate).

The analysis windows are the scenarios' (devstack.rollouts.SCENARIO_ANALYSIS: 60 rides, 100 outcomes, a 15 s
bake), not the production defaults (rollout.settings.AnalysisSettings: 200 rides, a 30 min bake), which would
take minutes per rollout at this traffic; rides end 120 times sooner than in the city (devstack.stack's
OUTCOME_TIME_COMPRESSION). docs/rollout-controller.md says how long the defaults take at 1, 10 and 100 rides/s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
from pathlib import Path

from devstack.rollouts import NOTICE_BOUND_SECONDS, RESYNC_SECONDS, ROLLOUT_SCENARIOS, RolloutStack, rollout_at_rate

# Riders per second in the two paced rollouts: a quiet hour's share of the local stack, and four times it.
TRAFFIC_RATES = (2.0, 8.0)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    results = {}
    # MLflow prints a line per run it ends on stdout: to stderr with the logs, so stdout is the one JSON document.
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp, contextlib.redirect_stdout(sys.stderr):
        stack = RolloutStack(Path(tmp) / "stack", record_access=False)  # timings without the recording proxies
        try:
            stack.start()
            for name, scenario in ROLLOUT_SCENARIOS.items():
                print(f"scenario {name} ...", file=sys.stderr)
                results[name] = scenario(stack)
            for rate in TRAFFIC_RATES:
                print(f"a rollout at {rate:g} rides/s ...", file=sys.stderr)
                results[rate] = rollout_at_rate(stack, f"paced-at-{rate:g}", rate)
        finally:
            for line in stack.stop():
                print(f"stopped {line}", file=sys.stderr)

    killed, blocked = results["controller-killed"], results["broken-blocked"]
    dropped = results["webhook-dropped"]
    outage, overlap = results["pubsub-unavailable"], results["deployed-over-itself"]
    document = {
        "retrained_version_with_the_controller_killed_mid_shadow": {
            "outcome": {"value": killed["outcome"], "target": "rolled out"},
            "attempts": {"value": killed["attempts"], "target": "2 (resumed, not restarted)"},
            "seconds_from_alias_set_to_riders_on_it": {"value": killed["seconds_from_alias_set_to_riders_on_it"]},
            "lost": {"value": killed["lost"], "target": 0},
            "rides": killed["rides"],
            "restarted_after_seconds": killed.get("restarted_after_seconds"),
            "phases": killed["phases"],
        },
        "broken_version": {
            "outcome": {"value": blocked["outcome"], "target": "blocked"},
            "riders_answered_by_it": {"value": blocked["riders_answered_by_it"], "target": 0},
            "lost": {"value": blocked["lost"], "target": 0},
            "alias_back_on_the_serving_version": {"value": blocked["alias_back_on"] == blocked["serving_before"], "target": True},
            "reason": blocked["tags"].get("rollout_reason"),
            "seconds_from_alias_set_to_blocked": blocked["seconds_from_alias_set_to_rollout_ended"],
            "phases": blocked["phases"],
        },
        "rollback_to_known_good": {
            "seconds_of_the_rollout": {"value": dropped["rollout_seconds"], "target": "seconds: pre-flight and the switch only"},
            "seconds_from_alias_set_to_riders_on_it": {"value": dropped["seconds_from_alias_set_to_riders_on_it"]},
            "message": dropped["message"],
        },
        "missed_webhook": {
            "seconds_to_converge": {
                "value": dropped["seconds_from_alias_set_to_rollout_ended"],
                "target": f"<= {RESYNC_SECONDS} s resync + the rollout's {dropped['rollout_seconds']} s",
            },
            "seconds_before_the_controller_noticed": {
                "value": round(dropped["seconds_from_alias_set_to_rollout_ended"] - dropped["rollout_seconds"], 2),
                "target": f"<= {NOTICE_BOUND_SECONDS}",
            },
            "lost": {"value": dropped["lost"], "target": 0},
        },
        "pubsub_unavailable_for_a_minute_mid_shadow": {
            "outcome": {"value": outage["outcome"], "target": "rolled out"},
            "lost": {"value": outage["lost"], "target": 0},
            "shadow_rides": {"value": outage["recorded"].get("shadow", {}).get("rides"), "target": ">= 60"},
        },
        "controller_deployed_over_itself": {
            "outcome": {"value": overlap["outcome"], "target": "rolled out"},
            "samples_with_both_holding_the_lease": {"value": overlap["both_held"], "target": 0},
            "lost": {"value": overlap["lost"], "target": 0},
        },
        "per_phase_at_two_traffic_rates": {f"{rate:g}_rides_per_second": _paced(results[rate]) for rate in TRAFFIC_RATES},
    }
    print(json.dumps(document, indent=2))


def _paced(result: dict) -> dict:
    """A paced rollout's figures beside their targets: every phase decided, the shadow on its outcomes."""
    shadow = result["phases"].get("shadow", {})
    return {
        "outcome": {"value": result["outcome"], "target": "rolled out"},
        "rides_per_second_measured": result["rides_per_second"],
        "lost": {"value": result["lost"], "target": 0},
        "shadow_rmse_gate_applied": {"value": "RMSE gate: applied" in shadow.get("rmse_gate", ""), "target": True},
        "seconds_from_alias_set_to_rollout_ended": result["seconds_from_alias_set_to_rollout_ended"],
        "phases": result["phases"],  # per phase: seconds_to_decision and the evidence it had
    }


if __name__ == "__main__":
    main()
