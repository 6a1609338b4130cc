"""What `python -m devstack status` asks every part of the stack, side by side, each with a short timeout.

A frozen or hung service (issue 31: a SIGSTOPped rollout controller held `make status` 38.9 s, then a
ReadTimeout traceback, and nothing about the rest) costs its own check's timeout and is named as
such; the others are still reported. Nothing here imports MLflow: its import alone takes 5-17 s on
a busy machine, so the registry is read through its REST API.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from devstack.processes import pid_alive, ready_check

CHECK_TIMEOUT_SECONDS = 2.0  # each HTTP or Redis question
DEADLINE_SECONDS = 2.5  # every check, side by side; what is not back by then is reported as unanswered


@dataclass(frozen=True)
class NoAnswer:
    """A check that raised, or had not returned by the deadline."""

    reason: str

    def __str__(self) -> str:
        return self.reason


def side_by_side(checks: dict[str, Callable[[], Any]], deadline: float = DEADLINE_SECONDS) -> dict[str, Any]:
    """Run every check at once; each one's result, or NoAnswer. Daemon threads: one stuck past the deadline
    (a connection to a frozen process) neither delays the answer nor the exit."""
    results: dict[str, Any] = {}

    def run(name: str, check: Callable[[], Any]) -> None:
        try:
            results[name] = check()
        except Exception as exc:  # a check's failure is its answer, never the report's end
            results[name] = NoAnswer(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in checks.items()]
    for thread in threads:
        thread.start()
    ends = time.monotonic() + deadline
    for thread in threads:
        thread.join(max(0.0, ends - time.monotonic()))
    return {name: results.get(name, NoAnswer(f"no answer within {deadline:.0f} s")) for name in checks}


def process_stopped(pid: int) -> bool:
    """The process is stopped by a signal (SIGSTOP, SIGTSTP): alive, but answers nothing."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def service_state(pid: int, ready: str | None) -> str:
    """running, DEAD, FROZEN (stopped by a signal) or NOT ANSWERING (alive, silent past the check's timeout)."""
    if not pid_alive(pid):
        return "DEAD"
    if process_stopped(pid):
        return "FROZEN (stopped by a signal: SIGCONT resumes it)"
    if ready and not ready_check(ready)():
        return f"NOT ANSWERING within {CHECK_TIMEOUT_SECONDS:.0f} s"
    return "running"


def registry_alias(mlflow_url: str, model_name: str, alias: str) -> dict | None:
    """The version an alias names (version, run_id, source), None when the alias or model does not exist."""
    response = requests.get(
        f"{mlflow_url}/api/2.0/mlflow/registered-models/alias",
        params={"name": model_name, "alias": alias},
        timeout=CHECK_TIMEOUT_SECONDS,
    )
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.json()["model_version"]


def json_of(url: str, any_status: bool = False, headers: dict[str, str] | None = None) -> dict:
    """The JSON a GET answers; ``any_status``: an error status's body counts too (a /readyz saying why it is not ready)."""
    response = requests.get(url, headers=headers, timeout=CHECK_TIMEOUT_SECONDS)
    if not any_status:
        response.raise_for_status()
    return response.json()
