"""Keep a deployment serving the model version one registry alias points at: serialized, idempotent, retried.

Webhook events only say "look again": the worker reads the alias from the registry
itself, compares it with what the target serves, and deploys only the difference. It
also looks again every ``resync_seconds`` without being told (level-triggered): MLflow
delivers each webhook fire-and-forget, so a lost delivery is corrected within one period. So
a repeated event is a no-op, two quick promotions end on the last one (however the
events interleave or arrive), and an alias moved back is a rollback by the same path.
A deployment that fails is reported and tried again with backoff; the target's
previous deployment keeps serving meanwhile (both targets deploy side by side and
switch only once the new one runs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

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
    ):
        self.alias = alias
        # Told (what serves now, what is about to replace it) before each deploy: production marks the
        # version really serving as `previous`, so a rollback after a failed rollout goes back one step.
        self._before_switch = before_switch
        self.resync_seconds = resync_seconds
        # Before a version is deployed, it must pass this (rollout.preflight.run: .passed, .reason);
        # ``story`` is told what became of it (.blocked / .rolled_out) and keeps the registry honest.
        self._preflight = preflight
        self._story = story
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
            self._wake.clear()
            try:
                self.reconcile()
            except Exception as exc:  # reported and retried; the previous deployment keeps serving
                self.failures += 1
                backoff = min(self._retry_initial * 2 ** (self.failures - 1), self._retry_max)
                self.retry_at = time.time() + backoff
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "%s: rollout failed, retrying in %.0f s; the previous deployment keeps serving: %s",
                    self.alias,
                    backoff,
                    self.last_error,
                )
                continue
            self.failures, self.last_error, self.retry_at = 0, None, None
            if not self._wake.is_set():
                self._idle.set()

    # --- one pass -----------------------------------------------------------------------------
    def reconcile(self) -> str:
        """Deploy what the alias points at, if the target serves anything else; says what it did."""
        with self._lock:
            wanted = self._resolve(self.alias)
            serving = self.target.serving()
            if wanted is None:
                return self._record("no-op", f"the registry has no {self.alias!r} alias; nothing to roll out", serving, None)
            if serving is not None and serving.run_id == wanted.run_id and serving.version == wanted.version:
                return self._record("no-op", f"already serving v{wanted.version}", serving, wanted)
            started = time.time()
            log.info(
                "rolling out",
                extra={
                    "alias": self.alias,
                    "version": wanted.version,
                    "run_id": wanted.run_id,
                    "from": asdict(serving) if serving else None,
                },
            )
            verdict = self._preflight(wanted) if self._preflight is not None else None
            if verdict is not None and not verdict.passed:
                kept = f"v{serving.version} keeps serving" if serving else "nothing is deployed"
                if self._story is not None:
                    self._story.blocked(self.alias, wanted, serving, verdict)
                return self._record(
                    "blocked", f"v{wanted.version} blocked at pre-flight: {verdict.reason}; {kept}", serving, wanted
                )
            if self._before_switch is not None and serving is not None:
                try:
                    self._before_switch(serving, wanted)
                except Exception as exc:  # bookkeeping only: the rollout goes on
                    log.warning("%s: before the switch: %s: %s", self.alias, type(exc).__name__, exc)
            self.target.deploy(wanted)
            now_serving = self.target.serving()
            if now_serving is None or now_serving.run_id != wanted.run_id:
                raise RuntimeError(f"{self.target.name} reports {now_serving} after deploying v{wanted.version}")
            seconds = round(time.time() - started, 2)
            if self._story is not None:
                try:
                    self._story.rolled_out(self.alias, now_serving, serving, verdict, seconds)
                except Exception as exc:  # bookkeeping only: the rollout itself succeeded
                    log.warning("%s: telling the version's story: %s: %s", self.alias, type(exc).__name__, exc)
            return self._record("rolled out", f"v{wanted.version} serving after {seconds} s", now_serving, wanted, seconds)

    def _record(
        self, outcome: str, message: str, serving: Deployment | None, wanted: Deployment | None, seconds: float | None = None
    ) -> str:
        if outcome != "no-op" or not self.history or self.history[-1]["message"] != message:
            self.history.append(
                {
                    "at": time.time(),
                    "outcome": outcome,
                    "message": message,
                    "version": wanted.version if wanted else None,
                    "seconds": seconds,
                }
            )
        log.info("%s: %s", self.alias, message)
        return message

    def status(self) -> dict[str, Any]:
        """The registry's alias and what the target serves, side by side, and whether they differ."""
        wanted, serving, problem = None, None, None
        try:
            wanted = self._resolve(self.alias)
            serving = self.target.serving()
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        rolling_out = self._lock.locked()  # a pass is under way: not settled, whatever the target says yet
        in_sync = (
            problem is None and not rolling_out and wanted is not None and serving is not None and serving.run_id == wanted.run_id
        )
        state = "in sync" if in_sync else "rolling out" if rolling_out else "failing" if self.last_error else "out of sync"
        return {
            "alias": self.alias,
            "target": self.target.name,
            "registry": asdict(wanted) if wanted else None,
            "serving": asdict(serving) if serving else None,
            "in_sync": in_sync,
            "state": state,
            "problem": problem,
            "last_error": self.last_error,
            "failures": self.failures,
            "retry_in_seconds": round(self.retry_at - time.time(), 1) if self.retry_at else None,
            "resync_seconds": self.resync_seconds,
            "history": list(self.history)[-5:],
        }
