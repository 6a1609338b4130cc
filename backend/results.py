"""Where rides wait for their accurate duration, keyed by ride_id.

In memory for one process (local default); Redis for several replicas: the
replica whose listener receives a result is rarely the one the client asks, so
the result must land in a store all of them read. Correlation is by ride_id
only, which the backend generates, so one ride's result never reaches another.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol

MAX_IN_MEMORY_RIDES = 100_000


class ResultStore(Protocol):
    def create(self, ride_id: str, record: dict[str, Any]) -> bool:
        """Store a new pending ride; False if the ride_id is taken."""

    def discard(self, ride_id: str) -> None: ...

    def complete(self, ride_id: str, result: dict[str, Any], status: str = "done") -> None:
        """Add the accurate result (or, with status "failed", the reason) and wake whoever waits."""

    def get(self, ride_id: str) -> dict[str, Any] | None: ...

    def wait(self, ride_id: str, timeout: float) -> dict[str, Any] | None:
        """The ride once it is no longer pending, or as it is when ``timeout`` runs out."""

    def ping(self) -> None: ...


def _merge(record: dict[str, Any] | None, result: dict[str, Any], status: str) -> dict[str, Any]:
    return {**(record or {"ride_id": result["ride_id"]}), **result, "status": status}


def _settled(record: dict[str, Any] | None) -> bool:
    return record is not None and record.get("status") != "pending"


class InMemoryResultStore:
    def __init__(self, ttl_seconds: float = 86400, max_rides: int = MAX_IN_MEMORY_RIDES):
        self._rides: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._changed = threading.Condition()
        self._ttl = ttl_seconds
        self._max = max_rides

    def _expire(self) -> None:
        cutoff = time.monotonic() - self._ttl
        while self._rides and (len(self._rides) > self._max or next(iter(self._rides.values()))[0] < cutoff):
            self._rides.popitem(last=False)

    def create(self, ride_id: str, record: dict[str, Any]) -> bool:
        with self._changed:
            self._expire()
            if ride_id in self._rides:
                return False
            self._rides[ride_id] = (time.monotonic(), dict(record))
            return True

    def discard(self, ride_id: str) -> None:
        with self._changed:
            self._rides.pop(ride_id, None)

    def complete(self, ride_id: str, result: dict[str, Any], status: str = "done") -> None:
        with self._changed:
            created, record = self._rides.get(ride_id, (time.monotonic(), None))
            self._rides[ride_id] = (created, _merge(record, result, status))
            self._changed.notify_all()

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


class RedisResultStore:
    """One JSON value per ride (``ride:<id>``) with a TTL; a Redis channel per ride wakes waiters."""

    def __init__(self, url: str, ttl_seconds: int = 86400, prefix: str = "ridestream"):
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=5, health_check_interval=30)
        self._ttl = ttl_seconds
        self._prefix = prefix

    def _key(self, ride_id: str) -> str:
        return f"{self._prefix}:ride:{ride_id}"

    def _channel(self, ride_id: str) -> str:
        return f"{self._prefix}:done:{ride_id}"

    def create(self, ride_id: str, record: dict[str, Any]) -> bool:
        return bool(self._redis.set(self._key(ride_id), json.dumps(record), nx=True, ex=self._ttl))

    def discard(self, ride_id: str) -> None:
        self._redis.delete(self._key(ride_id))

    def complete(self, ride_id: str, result: dict[str, Any], status: str = "done") -> None:
        key = self._key(ride_id)
        # Last writer wins; two deliveries of one ride carry the same result.
        self._redis.set(key, json.dumps(_merge(self.get(ride_id), result, status)), ex=self._ttl)
        self._redis.publish(self._channel(ride_id), "done")

    def get(self, ride_id: str) -> dict[str, Any] | None:
        raw = self._redis.get(self._key(ride_id))
        return json.loads(raw) if raw else None

    def wait(self, ride_id: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self._channel(ride_id))  # before reading, so no completion slips between
            record = self.get(ride_id)
            while not _settled(record) and (left := deadline - time.monotonic()) > 0:
                if pubsub.get_message(timeout=left):
                    record = self.get(ride_id)
            return record
        finally:
            pubsub.close()

    def ping(self) -> None:
        self._redis.ping()


def make_store(redis_url: str, ttl_seconds: int, prefix: str = "ridestream") -> ResultStore:
    return RedisResultStore(redis_url, ttl_seconds, prefix) if redis_url else InMemoryResultStore(ttl_seconds)
