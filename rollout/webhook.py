"""MLflow registry webhooks: verify that a call comes from our MLflow server, once, and recently.

MLflow signs each delivery (Standard Webhooks style): ``X-MLflow-Signature: v1,<base64 HMAC-SHA256>``
over ``<delivery id>.<timestamp>.<body>`` with the webhook's secret, plus ``X-MLflow-Delivery-Id``
and ``X-MLflow-Timestamp`` (Unix seconds). A call is accepted only with a valid signature, a
timestamp within the tolerance, and a delivery id not seen before: a captured call cannot be
replayed, not even within the tolerance.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import threading
import time
from collections.abc import Callable, Mapping

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"


class Rejected(ValueError):
    """The call is not a fresh, authentic delivery; the message says why (it is logged, not acted on)."""


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The signature MLflow puts in ``X-MLflow-Signature`` (tests and the local stack's checks use it too)."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


class WebhookVerifier:
    def __init__(self, secret: str, tolerance_seconds: float = 300, clock: Callable[[], float] = time.time):
        if not secret:
            raise ValueError("a webhook secret is required: unsigned calls are never accepted")
        self._secret = secret
        self._tolerance = tolerance_seconds
        self._clock = clock
        # Delivery ids seen, kept until their *signed* timestamp leaves the window: from then on a replay
        # is refused by its timestamp anyway. Keyed on the sender's clock, not on when it arrived, so a
        # sender whose clock runs ahead cannot reopen the window (an id evicted by arrival time 300 s
        # after a call stamped 250 s ahead would be fresh again for another 250 s).
        self._seen: dict[str, int] = {}
        self._expiry: list[tuple[int, str]] = []  # heap of (signed timestamp, delivery id)
        self._lock = threading.Lock()

    def verify(self, headers: Mapping[str, str], body: bytes) -> str:
        """The delivery id of an authentic, fresh, first delivery; raises Rejected otherwise."""
        signature = headers.get(SIGNATURE_HEADER, "")
        delivery_id = headers.get(DELIVERY_ID_HEADER, "")
        timestamp = headers.get(TIMESTAMP_HEADER, "")
        if not (signature and delivery_id and timestamp):
            raise Rejected("unsigned: the signature, delivery id and timestamp headers are all required")
        try:
            sent_at = int(timestamp)
        except ValueError as exc:
            raise Rejected(f"timestamp {timestamp[:32]!r} is not Unix seconds") from exc
        now = self._clock()
        if abs(now - sent_at) > self._tolerance:
            raise Rejected(f"timestamp is {now - sent_at:+.0f} s from now (tolerance {self._tolerance:g} s)")
        expected = sign(self._secret, delivery_id, timestamp, body)
        # Several signatures may be sent space-separated (secret rotation); any valid one will do.
        if not any(hmac.compare_digest(expected, candidate) for candidate in signature.split()):
            raise Rejected("signature does not match")
        with self._lock:
            while self._expiry and self._expiry[0][0] < now - self._tolerance:
                _, expired = heapq.heappop(self._expiry)
                self._seen.pop(expired, None)
            if delivery_id in self._seen:
                raise Rejected(f"delivery {delivery_id[:64]} was already received (replay)")
            self._seen[delivery_id] = sent_at
            heapq.heappush(self._expiry, (sent_at, delivery_id))
        return delivery_id
