"""Faults on the real local stack: what riders see while something breaks and is repaired.

    python benchmarks/fault_bench.py [--scale 2] [--scenario redis-restart ...]

For each scenario of devstack/faults.py (backend replica kill -9 and SIGTERM, Redis restart,
hang and out of memory, storage emulator restart, function kill -9 and pause, ride_id reuse,
duplicate messages, a hanging publish with clients retrying elsewhere, both backends restarted
then finals on time, poison messages per deployment, failed cold starts): rides sent, done,
lost, failed, wrong answers, answers outside the duration bounds, client errors (HTTP 5xx other
than 503), 503s retried, and the seconds from the repair until every ride had settled, with
what each scenario measured on the way. A table goes to stderr; the JSON document, each figure
beside its target, to stdout.
Targets (issues 11 and 19): 0 lost, 0 wrong and 0 out of bounds in every scenario, no 500, every
503 with Retry-After, recovery within the bound, finals on time after a backend restart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from devstack.faults import RECOVERY_BOUND_SECONDS, SCENARIOS, FaultStack, dead_subscribers_reproduction, run_scenario

COLUMNS = [
    "scenario",
    "sent",
    "done",
    "lost",
    "failed",
    "wrong",
    "out_of_bounds",
    "server_errors",
    "retried_503",
    "recovery_seconds",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="rides per scenario, as a multiple of the test's")
    parser.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument(
        "--reproduce", action="store_true", help="also the emulator's dead-stream reproduction, streaming vs unary pull"
    )
    args = parser.parse_args()

    outcomes = []
    with tempfile.TemporaryDirectory(prefix="fault-bench-") as tmp:
        stack = FaultStack(Path(tmp) / "stack")
        try:
            stack.start()
            if args.reproduce:
                reproduction = {mode: dead_subscribers_reproduction(stack, mode) for mode in ("streaming", "unary")}
            for name in args.scenario:
                outcomes.append(run_scenario(stack, name, rides=int(SCENARIOS[name][1] * args.scale)))
                if name == "backend-restart-on-time":
                    outcomes[-1].notes.append(f"finals on time after the restart: {stack.on_time}")
                if name == "poison-messages":
                    outcomes[-1].notes.append(f"dead letters per source: {stack.dead_letters}")
        finally:
            stack.stop()

    table = Table(title="faults: what riders saw")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for outcome in outcomes:
        table.add_row(*(str(getattr(outcome, column)) for column in COLUMNS))
    Console(file=sys.stderr, width=140).print(table)

    rows = [outcome.row() for outcome in outcomes]
    print(
        json.dumps(
            {
                "scenarios": rows,
                # Results of 32 that reached a new listener within 2 s after two listeners were killed (target: all).
                "emulator_dead_streams": reproduction if args.reproduce else None,
                "totals": {
                    k: sum(r[k] for r in rows)
                    for k in ("sent", "done", "lost", "failed", "wrong", "out_of_bounds", "server_errors")
                },
                "targets": {
                    "zero_lost": all(r["lost"] == 0 for r in rows),
                    "zero_wrong": all(r["wrong"] == 0 for r in rows),
                    "zero_out_of_bounds": all(r["out_of_bounds"] == 0 for r in rows),
                    "no_server_errors": all(r["server_errors"] == 0 for r in rows),
                    "every_503_with_retry_after": all(r["missing_retry_after"] == 0 for r in rows),
                    f"recovered_within_{RECOVERY_BOUND_SECONDS}_s": all(
                        r["recovery_seconds"] < RECOVERY_BOUND_SECONDS for r in rows
                    ),
                    "finals_on_time_after_a_backend_restart": stack.on_time
                    if "backend-restart-on-time" in args.scenario
                    else None,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
