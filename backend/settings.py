"""The backend's configuration: every environment variable it reads, in one place."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ride_contract.ride import MIN_DURATION_MINUTES

DEFAULT_COARSE_MODEL = Path(__file__).resolve().parent / "coarse_model.json"
DEFAULT_ZONE_GUIDE = Path(__file__).resolve().parent / "zone_guide.json"
# How long a ride's record lives in the result store. After its final the record is still needed for
# the rider's outcome: the ride lasts up to 60 minutes (ride_contract's MAX_DURATION_MINUTES) and the app
# reports its outcome when the ride ends, often later (the phone offline, the app closed: issue 33), and
# record_outcome needs the record. Four hours leave three after the longest ride for a late outcome;
# nothing else reads a record after its outcome is published (the outcome goes to the outcomes topic and
# the bucket). A day held 6x the memory for nothing: 4 h at the default maximum rate fits the default
# Memorystore (infra/variables.tf; benchmarks/capacity.py checks it).
DEFAULT_RESULT_TTL_SECONDS = 4 * 3600
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$")


def allowed_origins(text: str) -> tuple[str, ...]:
    """CORS_ALLOWED_ORIGINS: comma-separated origins ("https://app.example.com"), each exactly as a
    browser sends it. Empty: no other origin may call the API from a browser. "*" is refused: the
    allow-list is explicit."""
    origins = tuple(origin.strip().rstrip("/") for origin in text.split(",") if origin.strip())
    bad = [origin for origin in origins if not _ORIGIN.match(origin)]
    if bad:
        raise ValueError(f"CORS_ALLOWED_ORIGINS: {', '.join(bad)} is not an origin like https://app.example.com")
    return origins


def _not_negative(name: str, text: str) -> float:
    """A number of seconds, 0 or more; empty: the default (the contract's shortest ride)."""
    if not text.strip():
        return MIN_DURATION_MINUTES * 60
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a number of seconds") from None
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{name}: {text!r} must be 0 or more seconds")
    return seconds


def _limit(name: str, text: str) -> str:
    """A limit as Flask-Limiter reads one ("60/minute", "20 per 10 seconds"), or a clear error at start."""
    from limits import parse_many

    try:
        parse_many(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a limit like '60/minute' or '20 per 10 seconds'") from None
    return text


def _count(name: str, text: str, least: int) -> int:
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a whole number") from None
    if count < least:
        raise ValueError(f"{name}: {text!r} must be {least} or more")
    return count


@dataclass(frozen=True)
class BackendSettings:
    project_id: str  # the Google Cloud project of the topics and subscriptions
    push_topic: str  # rides go out here (BACKEND_PUSH_STREAM)
    pull_subscription: str  # results come in here; every replica shares this one subscription
    # Empty: results live in this process (one replica only). redis://host:6379/0: shared by all replicas.
    redis_url: str
    redis_prefix: str  # key namespace, so several stacks can share one Redis
    coarse_model_path: Path  # the coarse model's JSON (training/coarse.py): the answer a rider gets at once
    max_wait_seconds: float  # upper bound for POST /predict?wait=N
    result_ttl_seconds: int
    max_body_bytes: int  # a request body larger than this is refused (413)
    publish_timeout_seconds: float  # seconds a ride's or an outcome's Publish call may take, transient errors retried within it
    resend_after_seconds: float  # a ride still pending this long is published again
    resend_max_attempts: int  # then it is marked failed
    redis_timeout_seconds: float  # a hanging Redis costs a request this long before its 503
    # Connections this process may open to Redis (REDIS_MAX_CONNECTIONS). A waiting long poll holds one
    # (its subscription) and reads the ride on a second, so two per serving thread (backend/Dockerfile:
    # 200), plus the listeners' and the resend sweep's. redis-py's default, 100, refused the 51st
    # concurrent poll with "Too many connections" (benchmarks/backend_bench.py found it). Memorystore
    # takes 65,000 clients: ten instances at 500 are 5,000.
    redis_max_connections: int
    # How results are pulled: "streaming" (production), or "unary" Pull calls, the default on the
    # Pub/Sub emulator, whose streaming pull keeps feeding the streams of dead clients.
    result_pull: str
    late_final_p95_ms: float  # /readyz says "degraded" when the p95 from POST to final is above this
    outcome_topic: str  # completed rides (answers and actual duration) go out here (BACKEND_OUTCOME_STREAM)
    # The shadow deployment's answers, kept on each ride for live quality; empty: not read.
    shadow_subscription: str
    quality_window_seconds: float  # live quality figures are over the rides completed in this window
    zone_guide_path: Path  # the rider page's zones and typical distances (ride_contract.zones)
    # Origins whose pages may call the API from a browser (CORS); empty: only the backend's own page.
    cors_allowed_origins: tuple[str, ...]
    # An outcome is refused (425) before the ride's POST plus this long: no ride of the contract ends sooner
    # (its shortest is MIN_DURATION_MINUTES), so an earlier outcome cannot be a real one. Tests and the demo
    # set it lower with their time compression (docs/outcomes.md).
    outcome_earliest_seconds: float = MIN_DURATION_MINUTES * 60
    # What a client, and everyone together, may ask (backend/limits.py; docs/api.md), as Flask-Limiter reads
    # a limit. A client is an address, and riders behind one carrier's NAT share theirs: generous per client.
    rides_per_client: str = "60/minute"  # POST /predict, retries of the same ride included
    # 130 rides/s: above the rate the defaults are sized for (100), below the one at which records would fill
    # the default Memorystore to its alert (131: benchmarks/capacity.py, memory_alert_rate; tests/test_limits.py).
    rides_overall: str = "7800/minute"
    # A long poll lasts at most max_wait_seconds (10 s): N per 10 seconds is at most N waiting at once.
    polls_per_client: str = "20 per 10 seconds"
    outcomes_per_client: str = "60/minute"  # as many as its rides: a client cannot report what it did not book
    outcomes_per_ride: str = "20/hour"  # an app's retries and a rider's corrections, many times over
    # Long polls waiting at once in one process: fewer than its threads (backend/Dockerfile: 200), so a POST
    # or a health check always finds a thread.
    long_polls_per_instance: int = 160
    # The front ends that append the client's address to X-Forwarded-For: 1 on Cloud Run, 2 behind a load
    # balancer (Cloud Armor), 0 when the service is reached directly (the client is the peer).
    trusted_proxy_hops: int = 1

    @property
    def final_bound_seconds(self) -> float:
        """How long a ride may wait for its final before the backend marks it failed (Redelivery)."""
        return self.resend_after_seconds * self.resend_max_attempts

    @classmethod
    def from_env(cls) -> BackendSettings:
        env = os.environ.get
        return cls(
            project_id=env("PROJECT_ID") or env("GOOGLE_CLOUD_PROJECT") or "ridestream-local",
            push_topic=env("BACKEND_PUSH_STREAM", "backend-push-stream"),
            pull_subscription=env("BACKEND_PULL_SUBSCRIPTION", "backend-pull-stream-backend"),
            redis_url=env("REDIS_URL", ""),
            redis_prefix=env("REDIS_PREFIX", "ridestream"),
            coarse_model_path=Path(env("COARSE_MODEL_PATH") or DEFAULT_COARSE_MODEL),
            max_wait_seconds=float(env("MAX_WAIT_SECONDS", "10")),
            result_ttl_seconds=int(env("RESULT_TTL_SECONDS", str(DEFAULT_RESULT_TTL_SECONDS))),
            max_body_bytes=int(env("MAX_BODY_BYTES", "16384")),
            publish_timeout_seconds=float(env("PUBLISH_TIMEOUT_SECONDS", "10")),
            resend_after_seconds=float(env("RESEND_AFTER_SECONDS", "30")),
            resend_max_attempts=int(env("RESEND_MAX_ATTEMPTS", "5")),
            redis_timeout_seconds=float(env("REDIS_TIMEOUT_SECONDS", "1")),
            redis_max_connections=int(env("REDIS_MAX_CONNECTIONS", "500")),
            result_pull=env("RESULT_PULL") or ("unary" if env("PUBSUB_EMULATOR_HOST") else "streaming"),
            late_final_p95_ms=float(env("LATE_FINAL_P95_SECONDS", "5")) * 1000,
            outcome_topic=env("BACKEND_OUTCOME_STREAM", "backend-outcome-stream"),
            shadow_subscription=env("BACKEND_SHADOW_SUBSCRIPTION", ""),
            quality_window_seconds=float(env("QUALITY_WINDOW_MINUTES", "60")) * 60,
            zone_guide_path=Path(env("ZONE_GUIDE_PATH") or DEFAULT_ZONE_GUIDE),
            cors_allowed_origins=allowed_origins(env("CORS_ALLOWED_ORIGINS", "")),
            outcome_earliest_seconds=_not_negative("OUTCOME_EARLIEST_SECONDS", env("OUTCOME_EARLIEST_SECONDS", "")),
            rides_per_client=_limit("LIMIT_RIDES_PER_CLIENT", env("LIMIT_RIDES_PER_CLIENT", cls.rides_per_client)),
            rides_overall=_limit("LIMIT_RIDES_OVERALL", env("LIMIT_RIDES_OVERALL", cls.rides_overall)),
            polls_per_client=_limit("LIMIT_POLLS_PER_CLIENT", env("LIMIT_POLLS_PER_CLIENT", cls.polls_per_client)),
            outcomes_per_client=_limit("LIMIT_OUTCOMES_PER_CLIENT", env("LIMIT_OUTCOMES_PER_CLIENT", cls.outcomes_per_client)),
            outcomes_per_ride=_limit("LIMIT_OUTCOMES_PER_RIDE", env("LIMIT_OUTCOMES_PER_RIDE", cls.outcomes_per_ride)),
            long_polls_per_instance=_count(
                "LIMIT_LONG_POLLS_PER_INSTANCE", env("LIMIT_LONG_POLLS_PER_INSTANCE", str(cls.long_polls_per_instance)), 1
            ),
            trusted_proxy_hops=_count("TRUSTED_PROXY_HOPS", env("TRUSTED_PROXY_HOPS", str(cls.trusted_proxy_hops)), 0),
        )
