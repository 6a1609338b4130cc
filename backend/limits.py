"""What one client, and all of them together, may ask of the backend (issue 34): a public API's limits.

Counted in the shared store (Flask-Limiter on the result store's Redis), so every replica counts alike:

  POST /predict             per client (RIDES_PER_CLIENT) and overall (RIDES_OVERALL: the rate the deployment
                            is sized for, benchmarks/capacity.py), each a moving window
  GET  /rides/<id>          per client (POLLS_PER_CLIENT, "N per 10 seconds": a long poll lasts at most
                            MAX_WAIT_SECONDS, 10 s, so a client never holds more than N of them at once)
  POST /rides/<id>/outcome  per client (OUTCOMES_PER_CLIENT) and per ride (OUTCOMES_PER_RIDE, rides that exist)

and, in this process, the long polls waiting at once (LONG_POLLS_PER_INSTANCE: fewer than its threads, so
POSTs and health checks always find one). Each refusal is a 429 with Retry-After (seconds) and the limit it
hit; a refused request changed nothing, so the same request later (the same ride_id) is taken once. The
limits are written as Flask-Limiter reads them ("60/minute", "10 per 10 seconds"); docs/api.md lists them.

The client is its address as the front end in front of the service saw it: Cloud Run appends it to
X-Forwarded-For, a load balancer (Cloud Armor) appends its own after it, so the address TRUSTED_PROXY_HOPS
from the right is the client's and whatever a client wrote in the header before it is ignored.
"""

from __future__ import annotations

import ipaddress
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, jsonify, request
from flask_limiter import Limiter, RequestLimit
from flask_limiter.util import get_remote_address
from werkzeug.middleware.proxy_fix import ProxyFix

from backend.settings import BackendSettings
from ride_contract.ride import RIDE_ID_PATTERN

_RIDE_ID = re.compile(RIDE_ID_PATTERN)


def refused(what: str) -> Callable[[RequestLimit], Any]:
    """The 429 for a breached limit: which limit, and when to come back (Retry-After, in whole seconds)."""

    def answer(limit: RequestLimit) -> Any:
        retry_after = max(1, math.ceil(limit.window.reset_time - time.time()))
        response = jsonify(
            {
                "error": f"too many requests: {what}, {limit.limit}; retry after {retry_after} s",
                "retry_after_seconds": retry_after,
            }
        )
        response.status_code = 429
        response.headers["Retry-After"] = str(retry_after)
        return response

    return answer


def client_key() -> str:
    """The client's address (after ProxyFix); an IPv6 client by its /64, a subscriber's whole prefix, so rotating
    addresses within it gains nothing."""
    address = get_remote_address()
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(getattr(ip, "ipv4_mapped", None) or ip)


class PollSlots:
    """The long polls this process lets wait at once; beyond them a poll is refused at once (429), not queued."""

    def __init__(self, slots: int):
        self.slots = slots
        self.in_use = 0
        self._lock = threading.Lock()

    @contextmanager
    def held(self) -> Iterator[bool]:
        """True while a slot is held; False (nothing held) when every slot is taken."""
        with self._lock:
            got = self.in_use < self.slots
            self.in_use += got
        try:
            yield got
        finally:
            if got:
                with self._lock:
                    self.in_use -= 1


class RiderLimits:
    """The limits on one app: ``rides``, ``polls`` and ``outcomes`` decorate its routes; ``poll_slots`` bounds
    the long polls waiting in this process."""

    def __init__(self, app: Flask, settings: BackendSettings):
        if settings.trusted_proxy_hops:
            app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops)  # type: ignore[method-assign]
        self.limiter = Limiter(
            client_key,
            app=app,
            # The result store's Redis: every replica counts together. Without one (a single replica), memory.
            storage_uri=settings.redis_url or "memory://",
            # A quarter of the store's own time: a hanging Redis delays a request's 503 a little, not twice over.
            storage_options={"socket_timeout": settings.redis_timeout_seconds / 4} if settings.redis_url else {},
            key_prefix=f"{settings.redis_prefix}:limits",
            strategy="moving-window",  # exact: no burst of twice the limit at a window's edge
            # Redis unreachable: each instance counts in its own memory until Redis answers again (checked with
            # backoff), so requests are neither refused for it nor held up by it; they meet the store's own 503.
            in_memory_fallback_enabled=True,
            swallow_errors=True,
            headers_enabled=False,  # Retry-After is the 429's; no X-RateLimit-* on every answer
        )
        limit = self.limiter.limit
        per_client = limit(settings.rides_per_client, scope="rides-per-client", on_breach=refused("rides per client"))
        # Everyone's counts the rides taken only (it is tested before, counted after), so a client's refused or
        # failed requests never use up everyone's, whichever limit Flask-Limiter looks at first.
        overall = self.limiter.shared_limit(
            settings.rides_overall,
            scope="rides-overall",
            key_func=lambda: "everyone",
            deduct_when=lambda response: response.status_code in (200, 202),
            on_breach=refused("rides for everyone"),
        )
        self.rides = lambda view: overall(per_client(view))
        self.polls = limit(settings.polls_per_client, scope="polls-per-client", on_breach=refused("polls per client"))
        # A client's outcomes, counted first; then the ride's, counted only for a ride that exists (not a 404) and
        # never for an id the contract refuses, so made-up ride ids leave nothing in Redis.
        outcomes_per_client = limit(
            settings.outcomes_per_client, scope="outcomes-per-client", on_breach=refused("outcomes per client")
        )
        outcomes_per_ride = limit(
            settings.outcomes_per_ride,
            scope="outcomes-per-ride",
            key_func=lambda: (request.view_args or {})["ride_id"],
            exempt_when=lambda: not _RIDE_ID.match((request.view_args or {}).get("ride_id", "")),
            deduct_when=lambda response: response.status_code != 404,
            on_breach=refused("outcomes per ride"),
        )
        self.outcomes = lambda view: outcomes_per_client(outcomes_per_ride(view))
        self.poll_slots = PollSlots(settings.long_polls_per_instance)
