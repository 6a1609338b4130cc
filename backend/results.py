"""Where rides wait for their accurate duration, keyed by ride_id, and which of them are due a resend.

In memory for one process (local default); Redis for several replicas: the replica
whose listener receives a result is rarely the one the client asks, and a replica
may die with rides in flight, so the records *and* the pending-ride bookkeeping
live in a store all of them share. Any live replica resends any overdue ride; a
claim (a lease of ``lease_seconds``) makes sure two replicas never both resend it.

The store is also the rides' outbox: a ride is recorded *before* it is published,
with a count of the publishes the broker confirmed (0 at first) and a time it is due
again. A publish that fails or hangs leaves the ride pending and due, so a resend (or
the client's retry) publishes it; a recorded ride is never forgotten.

A result is stored only on the pending ride it answers (same ride_id and the same
ride, by fingerprint): a result for an unknown or another ride, or one that does not
say which ride it answers, is refused, never turned into a "done" ride.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, deque
from enum import StrEnum
from typing import Any, Protocol

from ride_contract.outcome import completed_ride
from ride_contract.quality import add_ride, bucket_of, figures, sums_of, window_buckets

MAX_IN_MEMORY_RIDES = 100_000


class StoreUnavailable(RuntimeError):
    """The store cannot be reached: the caller answers 503 (retry), nothing was changed."""


class Completion(StrEnum):
    STORED = "stored"
    SETTLED = "settled"  # the ride already has its final answer: a repeat, nothing to do
    UNKNOWN = "unknown"  # no such ride here (never accepted, or expired)
    MISMATCH = "mismatch"  # the result is for another ride under the same ride_id


class OutcomeStatus(StrEnum):
    RECORDED = "recorded"
    SAME = "same"  # this outcome was recorded before: a repeat, nothing to do
    CONFLICT = "conflict"  # another outcome is recorded for the ride
    UNKNOWN = "unknown"  # no such ride here (never accepted, or expired)


class ResultStore(Protocol):
    def create(self, ride_id: str, record: dict[str, Any], resend_at: float) -> dict[str, Any] | None:
        """Record a new pending ride, not yet published, due a (re)send at ``resend_at`` (epoch seconds).

        Returns None when created, else the record already under ``ride_id`` (nothing changed)."""

    def reopen(self, ride_id: str, record: dict[str, Any], resend_at: float) -> bool:
        """Make a failed ride pending again (the same ride asked again), unpublished; False if it is not failed."""

    def published(self, ride_id: str, resend_at: float) -> None:
        """Count one publish the broker confirmed for a pending ride, and when it is due again."""

    def publishes(self, ride_id: str) -> int:
        """Publishes confirmed so far for a pending ride (0: it is not in the stream yet)."""

    def reschedule(self, ride_id: str, at: float) -> None:
        """A pending ride is due again at ``at`` (its publish failed: try again soon)."""

    def forget_pending(self, ride_id: str) -> None:
        """Drop a ride from the pending bookkeeping (its record is gone or settled)."""

    def complete(self, ride_id: str, result: dict[str, Any], status: str = "done") -> Completion:
        """Settle a pending ride with its result (or, with status "failed", the reason) and wake whoever waits."""

    def claim_due(self, now: float, lease_seconds: float, limit: int = 100) -> list[tuple[str, int]]:
        """Pending rides due a (re)send, as (ride_id, confirmed publishes), each claimed for ``lease_seconds``."""

    def add_shadow(self, ride_id: str, result: dict[str, Any]) -> Completion:
        """Keep a shadow deployment's answer on the ride it answers (never its status: riders do not see it)."""

    def record_outcome(self, ride_id: str, actual_minutes: float, now: float) -> tuple[OutcomeStatus, dict[str, Any] | None]:
        """Keep the ride's actual duration, once, and add its answers' errors to the live quality figures."""

    def outcome_published(self, ride_id: str) -> None:
        """The ride's completed record is on the outcomes topic."""

    def quality(self, now: float, window_seconds: float) -> dict[str, Any]:
        """Shared by every replica: each answering model's figures on the rides completed in the window."""

    def get(self, ride_id: str) -> dict[str, Any] | None: ...

    def wait(self, ride_id: str, timeout: float) -> dict[str, Any] | None:
        """The ride once it is no longer pending, or as it is when ``timeout`` runs out."""

    def ping(self) -> None: ...

    def stats(self, now: float) -> dict[str, Any]:
        """Shared by every replica: pending rides, and the final durations of the last minute (rate, latency)."""


# The window the stream's figures are computed over (rides/s over the last STATS_RATE_SECONDS).
STATS_WINDOW_SECONDS = 60
STATS_RATE_SECONDS = 10


def _stream_stats(pending: int, finals: list[tuple[float, float]], now: float) -> dict[str, Any]:
    """``finals``: (settled at, milliseconds from POST to final) of the last window."""
    latencies = sorted(ms for _, ms in finals)

    def percentile(share: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(share * len(latencies)))], 1) if latencies else None

    recent = sum(1 for at, _ in finals if at >= now - STATS_RATE_SECONDS)
    return {
        "pending_rides": pending,
        "finals_per_second": round(recent / STATS_RATE_SECONDS, 1),
        "latency_ms_p50": percentile(0.5),
        "latency_ms_p95": percentile(0.95),
        "finals_in_window": len(latencies),
    }


def _latency_ms(record: dict[str, Any], now: float) -> float:
    return max(0.0, (now - float(record.get("requested_at", now))) * 1000)


def _completion(record: dict[str, Any] | None, result: dict[str, Any], status: str) -> Completion | None:
    """Why ``result`` must not be stored on ``record``, or None if it may."""
    if record is None:
        return Completion.UNKNOWN
    if record.get("status") == "done" or (record.get("status") == "failed" and status == "failed"):
        return Completion.SETTLED  # a late true answer may still replace "failed"
    # Fail closed: a result that does not name the ride it answers cannot be matched to this one.
    answered, asked = result.get("ride_fingerprint"), record.get("fingerprint")
    if status == "done" and (not answered or not asked or answered != asked):
        return Completion.MISMATCH
    return None


def _settle(record: dict[str, Any], result: dict[str, Any], status: str) -> dict[str, Any]:
    """The ride's record with its result (the record keeps its own fingerprint, checked above)."""
    return {**record, **{k: v for k, v in result.items() if k != "ride_fingerprint"}, "status": status}


def _settled(record: dict[str, Any] | None) -> bool:
    return record is not None and record.get("status") != "pending"


def _with_shadow(record: dict[str, Any] | None, result: dict[str, Any]) -> tuple[Completion, dict[str, Any] | None]:
    """The record with a shadow answer kept under its version, or why not (by the same ride's fingerprint)."""
    if record is None:
        return Completion.UNKNOWN, None
    answered, asked = result.get("ride_fingerprint"), record.get("fingerprint")
    if not answered or answered != asked:
        return Completion.MISMATCH, None
    version = str(result.get("model_version") or "?")
    shadows = record.get("shadow") or {}
    if version in shadows:
        return Completion.SETTLED, None  # a redelivery of the same answer
    answer = {
        "duration_final": result["duration_final"],
        "model_run_id": result.get("model_run_id") or "",
        "clipped": bool(result.get("clipped")),
    }
    return Completion.STORED, {**record, "shadow": {**shadows, version: answer}}


def _with_outcome(record: dict[str, Any] | None, actual: float, now: float) -> tuple[OutcomeStatus, dict[str, Any] | None]:
    """The record with its actual duration, or (SAME/CONFLICT) the record that already has one."""
    if record is None:
        return OutcomeStatus.UNKNOWN, None
    recorded = record.get("actual_minutes")
    if recorded is not None:
        return (OutcomeStatus.SAME if abs(float(recorded) - actual) < 0.005 else OutcomeStatus.CONFLICT), record
    return OutcomeStatus.RECORDED, {**record, "actual_minutes": actual, "outcome_at": now, "outcome_published": False}


class InMemoryResultStore:
    def __init__(self, ttl_seconds: float = 86400, max_rides: int = MAX_IN_MEMORY_RIDES):
        self._rides: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._due: dict[str, float] = {}  # pending ride_id -> when to resend
        self._sends: dict[str, int] = {}
        self._finals: deque[tuple[float, float]] = deque(maxlen=100_000)  # (settled at, ms from POST)
        self._quality: dict[int, dict[str, float]] = {}  # bucket -> sums (ride_contract.quality)
        self._changed = threading.Condition()
        self._ttl = ttl_seconds
        self._max = max_rides

    def _expire(self) -> None:
        cutoff = time.monotonic() - self._ttl
        while self._rides and (len(self._rides) > self._max or next(iter(self._rides.values()))[0] < cutoff):
            ride_id, _ = self._rides.popitem(last=False)
            self._forget(ride_id)

    def _forget(self, ride_id: str) -> None:
        self._due.pop(ride_id, None)
        self._sends.pop(ride_id, None)

    def create(self, ride_id: str, record: dict[str, Any], resend_at: float) -> dict[str, Any] | None:
        with self._changed:
            self._expire()
            if ride_id in self._rides:
                return dict(self._rides[ride_id][1])
            self._rides[ride_id] = (time.monotonic(), dict(record))
            self._due[ride_id] = resend_at
            self._sends[ride_id] = 0
            return None

    def reopen(self, ride_id: str, record: dict[str, Any], resend_at: float) -> bool:
        with self._changed:
            entry = self._rides.get(ride_id)
            if entry is None or entry[1].get("status") != "failed":
                return False
            self._rides[ride_id] = (time.monotonic(), dict(record))
            self._due[ride_id] = resend_at
            self._sends[ride_id] = 0
            return True

    def published(self, ride_id: str, resend_at: float) -> None:
        with self._changed:
            if ride_id in self._due:
                self._due[ride_id] = resend_at
                self._sends[ride_id] += 1

    def publishes(self, ride_id: str) -> int:
        with self._changed:
            return self._sends.get(ride_id, 0)

    def reschedule(self, ride_id: str, at: float) -> None:
        with self._changed:
            if ride_id in self._due:
                self._due[ride_id] = at

    def forget_pending(self, ride_id: str) -> None:
        with self._changed:
            self._forget(ride_id)

    def complete(self, ride_id: str, result: dict[str, Any], status: str = "done") -> Completion:
        with self._changed:
            created, record = self._rides.get(ride_id, (0.0, None))
            refused = _completion(record, result, status)
            if refused is not None:
                return refused
            self._rides[ride_id] = (created, _settle(record, result, status))
            self._forget(ride_id)
            if status == "done":
                now = time.time()
                self._finals.append((now, _latency_ms(record, now)))
            self._changed.notify_all()
            return Completion.STORED

    def claim_due(self, now: float, lease_seconds: float, limit: int = 100) -> list[tuple[str, int]]:
        with self._changed:
            due = sorted((at, ride_id) for ride_id, at in self._due.items() if at <= now)[:limit]
            claimed = []
            for _, ride_id in due:
                self._due[ride_id] = now + lease_seconds
                claimed.append((ride_id, self._sends[ride_id]))
            return claimed

    def add_shadow(self, ride_id: str, result: dict[str, Any]) -> Completion:
        with self._changed:
            created, record = self._rides.get(ride_id, (0.0, None))
            completion, changed = _with_shadow(record, result)
            if changed is not None:
                self._rides[ride_id] = (created, changed)
            return completion

    def record_outcome(self, ride_id: str, actual_minutes: float, now: float) -> tuple[OutcomeStatus, dict[str, Any] | None]:
        with self._changed:
            created, record = self._rides.get(ride_id, (0.0, None))
            status, changed = _with_outcome(record, actual_minutes, now)
            if status is OutcomeStatus.RECORDED:
                self._rides[ride_id] = (created, changed)
                add_ride(self._quality.setdefault(bucket_of(now), {}), completed_ride(changed))
            return status, dict(changed) if changed else None

    def outcome_published(self, ride_id: str) -> None:
        with self._changed:
            created, record = self._rides.get(ride_id, (0.0, None))
            if record is not None:
                self._rides[ride_id] = (created, {**record, "outcome_published": True})

    def quality(self, now: float, window_seconds: float) -> dict[str, Any]:
        with self._changed:
            for old in [b for b in self._quality if b < bucket_of(now - self._ttl)]:  # kept as long as the rides
                del self._quality[old]
            return figures([self._quality.get(b, {}) for b in window_buckets(now, window_seconds)], window_seconds)

    def get(self, ride_id: str) -> dict[str, Any] | None:
        with self._changed:
            entry = self._rides.get(ride_id)
            return dict(entry[1]) if entry else None

    def wait(self, ride_id: str, timeout: float) -> dict[str, Any] | None:
        with self._changed:
            self._changed.wait_for(lambda: _settled(self._rides.get(ride_id, (0, None))[1]), timeout)
            entry = self._rides.get(ride_id)
            return dict(entry[1]) if entry else None

    def ping(self) -> None:
        return None

    def stats(self, now: float) -> dict[str, Any]:
        with self._changed:
            finals = [f for f in self._finals if f[0] >= now - STATS_WINDOW_SECONDS]
            return _stream_stats(len(self._due), finals, now)


# Record and schedule in one step: a ride is never recorded without being due a (re)send.
_CREATE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  redis.call('HSET', KEYS[3], ARGV[4], 0)
  return false
end
return redis.call('GET', KEYS[1])
"""
# A failed ride asked again: pending and unpublished once more, in one step.
_REOPEN = """
local raw = redis.call('GET', KEYS[1])
if not raw or cjson.decode(raw)['status'] ~= 'failed' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[4], 0)
return 1
"""
# A confirmed publish of a ride still pending: count it, and when it is due again.
_PUBLISHED = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
end
return 0
"""
# Claim the due rides atomically: whoever runs this first owns them for the lease. Publishes
# are counted when the broker confirms them (_PUBLISHED), never here.
_CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local claimed = {}
for _, ride_id in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], ride_id)
  table.insert(claimed, ride_id)
  table.insert(claimed, tonumber(redis.call('HGET', KEYS[2], ride_id) or '0'))
end
return claimed
"""


# Change a ride's record if it is still the one read, and apply what goes with the change, in one
# atomic step: an update is a GET and this script, two round trips, where WATCH, GET and MULTI...EXEC
# took three, and Redis no longer parses WATCH, MULTI, EXEC or queues each command of the update.
# KEYS[1]: the record; KEYS[1 + i]: what effect i acts on (a key, or PUBLISH's channel). ARGV: the
# record as read, the new record, then per effect its command, its argument count and its arguments.
_REPLACE_IF_UNCHANGED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
local at = 3
for effect = 2, #KEYS do
  local count = tonumber(ARGV[at + 1])
  redis.call(ARGV[at], KEYS[effect], unpack(ARGV, at + 2, at + 1 + count))
  at = at + 2 + count
end
return 1
"""
# A record changed under an update this many times in a row: the store is too contended to answer now.
MAX_UPDATE_ATTEMPTS = 50


class RedisResultStore:
    """One JSON value per ride (``<prefix>:ride:<id>``) with a TTL; the pending rides in a sorted set
    by resend time with their publish counts beside it; a Redis channel per ride wakes waiters."""

    # Connections kept for the next long poll's wait (beyond these, a finished wait's is closed).
    IDLE_WAIT_CONNECTIONS = 32

    def __init__(
        self,
        url: str,
        ttl_seconds: int = 86400,
        prefix: str = "ridestream",
        timeout_seconds: float = 1.0,
        reuse_wait_connections: bool = True,
        scripted_updates: bool = True,
        max_connections: int = 100,
    ):
        import redis

        # Every Redis failure a request can meet is a 503 to retry, never a 500: down, hanging
        # (the socket timeout), loading its data, or refusing writes (ResponseError: OOM under
        # maxmemory, READONLY during a failover, BUSY script).
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError)
        # A hanging Redis costs a request ``timeout_seconds``, not the rider's patience.
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            health_check_interval=30,
            # Past it a request gets "Too many connections" (a 503): each waiting long poll holds one.
            max_connections=max_connections,
        )
        self._ttl = ttl_seconds
        self._prefix = prefix
        self._pending = f"{prefix}:pending"
        self._sends = f"{prefix}:sends"
        self._finals = f"{prefix}:finals"  # sorted set: "<ride_id>:<ms from POST>" scored by when it was settled
        self._create = self._redis.register_script(_CREATE)
        self._reopen = self._redis.register_script(_REOPEN)
        self._published = self._redis.register_script(_PUBLISHED)
        self._claim_due = self._redis.register_script(_CLAIM_DUE)
        self._replace_if_unchanged = self._redis.register_script(_REPLACE_IF_UNCHANGED)
        # False: each update as an optimistic WATCH/MULTI/EXEC transaction, as before (the capacity
        # benchmark's baseline for the script).
        self._scripted_updates = scripted_updates
        # A wait subscribes on a connection of its own (a subscribed connection takes no other command).
        # Opening one per wait cost Redis a connection and a HELLO per ride (benchmarks/capacity.py);
        # finished waits leave theirs here, unsubscribed, for the next. False: one per wait, as before.
        self._reuse_wait_connections = reuse_wait_connections
        self._idle_waiters: list[Any] = []
        self._waiters_lock = threading.Lock()

    def _key(self, ride_id: str) -> str:
        return f"{self._prefix}:ride:{ride_id}"

    def _channel(self, ride_id: str) -> str:
        return f"{self._prefix}:done:{ride_id}"

    def _call(self, operation, *args, **kwargs):
        try:
            return operation(*args, **kwargs)
        except self._errors as exc:
            raise StoreUnavailable(f"Redis unavailable: {type(exc).__name__}: {exc}") from exc

    def create(self, ride_id: str, record: dict[str, Any], resend_at: float) -> dict[str, Any] | None:
        existing = self._call(
            self._create,
            keys=[self._key(ride_id), self._pending, self._sends],
            args=[json.dumps(record), self._ttl, resend_at, ride_id],
        )
        return json.loads(existing) if existing else None

    def reopen(self, ride_id: str, record: dict[str, Any], resend_at: float) -> bool:
        keys = [self._key(ride_id), self._pending, self._sends]
        return bool(self._call(self._reopen, keys=keys, args=[json.dumps(record), self._ttl, resend_at, ride_id]))

    def published(self, ride_id: str, resend_at: float) -> None:
        self._call(self._published, keys=[self._pending, self._sends], args=[ride_id, resend_at])

    def publishes(self, ride_id: str) -> int:
        return int(self._call(self._redis.hget, self._sends, ride_id) or 0)

    def reschedule(self, ride_id: str, at: float) -> None:
        self._call(self._redis.zadd, self._pending, {ride_id: at}, xx=True)

    def forget_pending(self, ride_id: str) -> None:
        pipe = self._redis.pipeline()
        pipe.zrem(self._pending, ride_id).hdel(self._sends, ride_id)
        self._call(pipe.execute)

    def _change(self, ride_id: str, change, effects=None) -> Any:
        """One optimistic update of a ride's record, tried again if the record changes meanwhile:
        ``change(record) -> (answer, new record or None)``; with a new record, ``effects(new record)``
        lists what goes with it, as (command, key, *arguments), applied in the same atomic step.
        Returns the answer."""
        key = self._key(ride_id)
        for _ in range(MAX_UPDATE_ATTEMPTS):
            if self._scripted_updates:
                raw = self._call(self._redis.get, key)
                answer, changed = change(json.loads(raw) if raw else None)
                if changed is None:
                    return answer
                applied = self._call(self._replace_if_unchanged, **self._script_call(key, raw, changed, effects))
            else:
                answer, applied = self._call(
                    self._redis.transaction, self._transaction(key, change, effects), key, value_from_callable=True
                )
            if applied:
                return answer
        raise StoreUnavailable(f"ride {ride_id} changed under {MAX_UPDATE_ATTEMPTS} updates in a row")

    @staticmethod
    def _script_call(key: str, raw: bytes, changed: dict[str, Any], effects) -> dict[str, list]:
        keys, args = [key], [raw, json.dumps(changed)]
        for command, effect_key, *arguments in effects(changed) if effects else ():
            keys.append(effect_key)
            args += [command, len(arguments), *arguments]
        return {"keys": keys, "args": args}

    @staticmethod
    def _transaction(key: str, change, effects):
        """The same update as WATCH, GET, MULTI, SET, the effects, EXEC (redis-py retries a WatchError)."""

        def transaction(pipe) -> tuple[Any, bool]:
            raw = pipe.get(key)
            answer, changed = change(json.loads(raw) if raw else None)
            if changed is not None:
                pipe.multi()
                pipe.set(key, json.dumps(changed), keepttl=True)
                for command, effect_key, *arguments in effects(changed) if effects else ():
                    pipe.execute_command(command, effect_key, *arguments)
            return answer, True

        return transaction

    def complete(self, ride_id: str, result: dict[str, Any], status: str = "done") -> Completion:
        def change(record):
            refused = _completion(record, result, status)
            return (refused, None) if refused is not None else (Completion.STORED, _settle(record, result, status))

        def effects(settled) -> list[tuple]:
            done = [("ZREM", self._pending, ride_id), ("HDEL", self._sends, ride_id)]
            if status == "done":
                now = time.time()
                done += [
                    ("ZADD", self._finals, now, f"{ride_id}:{_latency_ms(settled, now):.1f}"),
                    ("ZREMRANGEBYSCORE", self._finals, 0, now - STATS_WINDOW_SECONDS),
                ]
            return [*done, ("PUBLISH", self._channel(ride_id), status)]

        return self._change(ride_id, change, effects)

    def add_shadow(self, ride_id: str, result: dict[str, Any]) -> Completion:
        return self._change(ride_id, lambda record: _with_shadow(record, result))

    def record_outcome(self, ride_id: str, actual_minutes: float, now: float) -> tuple[OutcomeStatus, dict[str, Any] | None]:
        bucket = f"{self._prefix}:quality:{bucket_of(now)}"

        def change(record):
            status, changed = _with_outcome(record, actual_minutes, now)
            return (status, changed), changed if status is OutcomeStatus.RECORDED else None

        def effects(recorded) -> list[tuple]:
            sums = sums_of(completed_ride(recorded))
            return [*(("HINCRBYFLOAT", bucket, field, value) for field, value in sums.items()), ("EXPIRE", bucket, self._ttl)]

        return self._change(ride_id, change, effects)

    def outcome_published(self, ride_id: str) -> None:
        self._change(ride_id, lambda record: (None, record and {**record, "outcome_published": True}))

    def quality(self, now: float, window_seconds: float) -> dict[str, Any]:
        pipe = self._redis.pipeline()
        for bucket in window_buckets(now, window_seconds):
            pipe.hgetall(f"{self._prefix}:quality:{bucket}")
        buckets = self._call(pipe.execute)
        return figures([{k.decode(): float(v) for k, v in b.items()} for b in buckets], window_seconds)

    def claim_due(self, now: float, lease_seconds: float, limit: int = 100) -> list[tuple[str, int]]:
        flat = self._call(self._claim_due, keys=[self._pending, self._sends], args=[now, now + lease_seconds, limit])
        return [(flat[i].decode(), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    def get(self, ride_id: str) -> dict[str, Any] | None:
        raw = self._call(self._redis.get, self._key(ride_id))
        return json.loads(raw) if raw else None

    def wait(self, ride_id: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self._waiters_lock:
            reused = self._idle_waiters.pop() if self._idle_waiters else None
        if reused is not None:
            try:
                return self._wait_on(reused, ride_id, deadline)
            except StoreUnavailable:
                # A kept connection can be stale (Redis restarted, or failed over, since): so are the
                # others kept with it. Drop them all, and wait once more on a new one.
                with self._waiters_lock:
                    stale, self._idle_waiters = self._idle_waiters, []
                for pubsub in stale:
                    pubsub.close()
        return self._wait_on(self._redis.pubsub(ignore_subscribe_messages=True), ride_id, deadline)

    def _wait_on(self, pubsub, ride_id: str, deadline: float) -> dict[str, Any] | None:
        channel = self._channel(ride_id)
        clean = False
        try:
            self._call(pubsub.subscribe, channel)  # before reading, so no completion slips between
            record = self.get(ride_id)
            while not _settled(record) and (left := deadline - time.monotonic()) > 0:
                # Any message means "look again" (one for an earlier wait's channel included): the record decides.
                if self._call(pubsub.get_message, timeout=left):
                    record = self.get(ride_id)
            clean = self._reuse_wait_connections and self._unsubscribed(pubsub, channel)
            return record
        finally:
            self._release_waiter(pubsub, clean)

    def _unsubscribed(self, pubsub, channel: str) -> bool:
        """Unsubscribe and read the confirmation, so the connection goes back with nothing pending on it.
        False if it cannot be (the wait has its answer either way: the connection is closed instead)."""
        try:
            self._call(pubsub.unsubscribe, channel)
            deadline = time.monotonic() + 0.5
            while pubsub.subscribed and time.monotonic() < deadline:
                self._call(pubsub.get_message, timeout=0.05)
        except StoreUnavailable:
            return False
        return not pubsub.subscribed

    def _release_waiter(self, pubsub, clean: bool) -> None:
        """A clean connection waits for the next wait; any other (an error, a wait cut short) is closed."""
        with self._waiters_lock:
            if clean and len(self._idle_waiters) < self.IDLE_WAIT_CONNECTIONS:
                self._idle_waiters.append(pubsub)
                return
        pubsub.close()

    def ping(self) -> None:
        self._call(self._redis.ping)

    def stats(self, now: float) -> dict[str, Any]:
        pipe = self._redis.pipeline()
        pipe.zcard(self._pending).zrangebyscore(self._finals, now - STATS_WINDOW_SECONDS, "+inf", withscores=True)
        pending, finals = self._call(pipe.execute)
        return _stream_stats(pending, [(at, float(member.rsplit(b":", 1)[1])) for member, at in finals], now)


def make_store(
    redis_url: str, ttl_seconds: int, prefix: str = "ridestream", timeout_seconds: float = 1.0, max_connections: int = 100
) -> ResultStore:
    if redis_url:
        return RedisResultStore(redis_url, ttl_seconds, prefix, timeout_seconds, max_connections=max_connections)
    return InMemoryResultStore(ttl_seconds)
