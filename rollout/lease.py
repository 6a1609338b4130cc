"""Exactly one controller acts: a lease in Redis, with a fencing token, held while acting.

Cloud Run's instance limit is per revision, so every deploy of the controller overlaps two instances for a
while; without a lease both would roll out, and each would read about half of the analysis subscriptions'
messages (issue 33). The lease:

  acquire  INCR <key>:fence (a number no holder ever had), then SET <key> "<holder>:<fence>" NX PX <ttl>
  renew    a Lua check-and-extend: the key's value must still be our token, then PEXPIRE
  check    right before every act (a deploy, an alias move, a tag write): a Lua read of the key's value and
           its remaining time; the act goes ahead only if the value is our token and more than ``margin``
           of the lease remains (a holder paused past its lease finds another token there and stops)
  release  a Lua compare-and-delete, at a clean stop: the next instance takes over at once

Redis evaluates each script atomically, and its TTLs run on the server's clock: two holders' clocks never
have to agree. The fencing number grows with every acquisition, so a token seen once is never valid again.
Memorystore in the cloud (the backend's instance, a key prefix of the controller's own), the stack's Redis
locally. https://redis.io/docs/latest/develop/use/patterns/distributed-locks/
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from rollout.reconcile import Superseded

log = logging.getLogger("rollout")

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_CHECK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PTTL', KEYS[1]) end
return -3
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLost(Superseded):
    """This controller does not hold the lease (any more): it must not act; the phase resumes with the holder."""


class RedisLease:
    """The controller's lease on one Redis key. ``check()`` before every act; a keeper thread acquires and renews it."""

    def __init__(
        self,
        client: Any,
        key: str,
        ttl_seconds: float = 15.0,
        margin_seconds: float = 5.0,
        holder: str | None = None,
        on_acquired: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ):
        if margin_seconds * 2 > ttl_seconds:
            raise ValueError(f"the lease's margin ({margin_seconds} s) must be under half its time ({ttl_seconds} s)")
        self._redis, self.key, self.fence_key = client, key, f"{key}:fence"
        self.ttl_ms, self.margin_ms = int(ttl_seconds * 1000), int(margin_seconds * 1000)
        self.holder = holder or uuid.uuid4().hex[:12]
        self.token: str | None = None  # "<holder>:<fence>" while held
        self._renew, self._check, self._release = (client.register_script(s) for s in (_RENEW, _CHECK, _RELEASE))
        self._on_acquired, self._on_lost = on_acquired, on_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.problem: str | None = None  # why the last try to acquire or renew failed (Redis unreachable)

    # --- the acts' side ---------------------------------------------------------------------------
    def held(self) -> bool:
        return self.token is not None

    def check(self) -> None:
        """Raise LeaseLost unless this controller holds the lease with more than the margin left (one round trip)."""
        token = self.token
        if token is None:
            raise LeaseLost("this controller does not hold the lease")
        try:
            remaining = int(self._check(keys=[self.key], args=[token]))
        except Exception as exc:  # Redis unreachable: nobody can say we still hold it
            raise LeaseLost(f"the lease cannot be checked: {type(exc).__name__}: {exc}") from exc
        if remaining == -3:
            self._lose("another controller holds the lease")
            raise LeaseLost("another controller holds the lease")
        if remaining < self.margin_ms:  # -1/-2 (no expiry, gone) or too little left to finish an act in
            raise LeaseLost(f"the lease has {remaining} ms left, under the {self.margin_ms} ms margin")

    # --- the keeper -------------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; True if this controller holds it now."""
        if self.token is not None:
            return self.renew()
        fence = int(self._redis.incr(self.fence_key))
        token = f"{self.holder}:{fence}"
        if not self._redis.set(self.key, token, nx=True, px=self.ttl_ms):
            return False
        self.token = token
        log.info("lease %s acquired (fence %d)", self.key, fence)
        if self._on_acquired is not None:
            self._on_acquired()
        return True

    def renew(self) -> bool:
        token = self.token
        if token is None:
            return False
        if int(self._renew(keys=[self.key], args=[token, self.ttl_ms])) != 1:
            self._lose("the lease expired or another controller took it")
            return False
        return True

    def _lose(self, why: str) -> None:
        if self.token is None:
            return
        self.token = None
        log.warning("lease %s lost: %s; this controller stops acting and reading", self.key, why)
        if self._on_lost is not None:
            self._on_lost()

    def release(self) -> None:
        token = self.token
        if token is None:
            return
        try:
            self._release(keys=[self.key], args=[token])
        finally:
            self._lose("released")

    def start(self) -> RedisLease:
        self._thread = threading.Thread(target=self._keep, name="rollout-lease", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.release()
        except Exception as exc:  # it expires by itself within its time
            log.warning("lease %s not released: %s: %s", self.key, type(exc).__name__, exc)

    def _keep(self) -> None:
        """Renew three times a lease's time; otherwise try to take it as often."""
        period, last_renewed = self.ttl_ms / 3000, time.monotonic()
        while not self._stop.is_set():
            try:
                if self.try_acquire():
                    last_renewed = time.monotonic()
                self.problem = None
            except Exception as exc:  # Redis unreachable: the lease runs out by itself; stop acting before it does
                self.problem = f"{type(exc).__name__}: {exc}"
                log.warning("lease %s: %s", self.key, self.problem)
                if time.monotonic() - last_renewed > (self.ttl_ms - self.margin_ms) / 1000:
                    self._lose(f"not renewed: {self.problem}")
            self._stop.wait(period)


class SingleInstance:
    """No lease store: this controller is the only one by configuration (ROLLOUT_SINGLE_INSTANCE=true; tests)."""

    holder = "single-instance"
    problem = None

    def held(self) -> bool:
        return True

    def check(self) -> None:
        return None

    def start(self) -> SingleInstance:
        return self

    def stop(self) -> None:
        return None
