"""What a ride costs, measured on the local stack, and what that makes of Google Cloud at 10 to 10,000 rides/s.

    python benchmarks/capacity.py [--rides 1000] [--concurrency 16]      (make bench-capacity)

1. Measured here, per ride, on a stack of its own (the emulators, the function and a challenger in
   shadow, one backend and a Redis of its own) while real March 2021 rides stream through and their
   outcomes come back: CPU-ms in the function, in the backend's request path and in its result
   listeners (the finals' and the shadow answers'); Redis's own CPU (beyond its idle CPU), its
   commands (by name), network bytes and memory held (INFO before and after), a ride record's size
   (MEMORY USAGE) and TTL; Pub/Sub messages and bytes on each topic (read back from subscriptions of
   the benchmark's own); the bytes each process logs, the function's prediction lines apart (the
   sink's, kept out of the _Default log bucket); how long the function and the backend take to start.
2. The fixes made, each before and after on the same Redis in the same run, alternating rounds:
   the long poll's kept connection, and a ride's updates as one compare-and-set script each.
3. Modelled (``capacity_model``, pure arithmetic, tested in tests/test_capacity.py): at each rate,
   the function's instances per revision (production and the shadow each scale to their own maximum),
   the backend's instances for its CPU and for the long polls it holds at once (Cloud Run's request
   concurrency, parsed from infra/), Redis operations/s, its thread's load and the memory held against
   the deployed Memorystore size and its alert (parsed from infra/), Pub/Sub volume (the Cloud Storage
   subscription apart), log volume (Cloud Run's request log entries included), the files added to
   Cloud Storage, and their price per month and per million rides, from ``PRICES``: each price with
   the public page it was read from and the date. Prices that could not be read are None, and the
   totals say which are missing rather than guess them. The first limit each rate meets (``limits``),
   whether the defaults hold DEFAULT_MAX_RIDES_PER_SECOND, and the monthly cost of an idle deployment.
4. A burst (``burst``): the step from 10 to 1,000 rides/s on the function and the backend, under the
   two bounds Cloud Run's autoscaling page allows, from the starts measured in 1.
5. Training at scale: fit time and peak memory on one to five real months, extrapolated.

One JSON document on stdout; logs on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path

from backend.settings import DEFAULT_RESULT_TTL_SECONDS

log = logging.getLogger("capacity")
REPO = Path(__file__).resolve().parent.parent
# The rate the default deployment claims to hold, sustained: stated here once. The model checks every
# default against it (tests/test_capacity.py), benchmarks/backend_bench.py drives it, docs/capacity.md quotes it.
DEFAULT_MAX_RIDES_PER_SECOND = 100
RATES = (10, DEFAULT_MAX_RIDES_PER_SECOND, 1_000, 10_000)
SECONDS_PER_MONTH = 30 * 24 * 3600  # the 30-day month of the Pub/Sub pricing page's own example
HOURS_PER_MONTH = SECONDS_PER_MONTH / 3600
GIB, TIB = 2**30, 2**40

# USD, as listed on the public pricing pages (Tier 1 regions such as us-central1, europe-west1), read on
# the date given from the stored copy of each page. "free": the monthly free allotment the page states.
# "via": where the page's figure was read when the official page itself had no readable stored copy.
PRICES = {
    "run_request_vcpu_second": {
        "usd": 0.000024,
        "free": 180_000,
        "what": "Cloud Run (and Cloud Run functions), CPU only during requests: per vCPU-second",
        "source": "https://cloud.google.com/run/pricing",
        "read": "2026-12-03",
    },
    "run_request_gib_second": {
        "usd": 0.0000025,
        "free": 360_000,  # this allotment from the official page
        # The official page's copy read was cut off before its memory price; this is the figure a
        # third-party guide quotes from it.
        "what": "Cloud Run, CPU only during requests: per GiB-second of memory",
        "source": "https://cloud.google.com/run/pricing",
        "via": "https://cloudchipr.com/blog/cloud-run-pricing",
        "read": "2026-12-03",
    },
    "run_requests_million": {
        "usd": 0.40,
        "free": 2,
        "what": "Cloud Run, CPU only during requests: per million requests",
        "source": "https://cloud.google.com/run/pricing",
        "read": "2026-12-03",
    },
    "run_instance_vcpu_second": {
        "usd": 0.000018,
        "free": 0,  # the page lists a free tier here too; its figure was cut off in the copy read, so none is taken
        "what": "Cloud Run, CPU always allocated (the backend, the rollout controller): per vCPU-second",
        "source": "https://cloud.google.com/run/pricing",
        "read": "2026-12-03",
    },
    "run_instance_gib_second": {
        "usd": None,
        "free": 0,
        "what": "Cloud Run, CPU always allocated: per GiB-second (not in the copy read)",
        "source": "https://cloud.google.com/run/pricing",
        "read": "2026-12-03",
    },
    "pubsub_tib": {
        "usd": 40.0,
        "free": 10 / 1024,  # 10 GiB, in TiB
        "what": "Pub/Sub throughput (publish and every delivery), per TiB; at least 1,000 bytes per publish, push or pull request",
        "source": "https://cloud.google.com/pubsub/pricing",
        "read": "2026-12-03",
    },
    "pubsub_storage_subscription_tib": {
        "usd": 50.0,
        "free": 0,  # "The first 10 GiB of Cloud Storage subscription throughput is not free."
        "what": "Pub/Sub Cloud Storage subscriptions (the completed rides' export), per TiB delivered; no free tier",
        "source": "https://cloud.google.com/pubsub/pricing",
        "via": "https://raw.githubusercontent.com/api-evangelist/google/refs/heads/main/plans/google-plans-pricing.yml (a transcription of the page, 2026-09-20)",
        "read": "2026-12-07",
    },
    "storage_standard_gib_month": {
        "usd": 0.020,  # the page's $0.000027397 per GiB-hour x 730 hours
        "free": 0,
        "what": "Cloud Storage Standard, regional (us-central1), per GiB-month: the completed rides' and the prediction lines' files",
        "source": "https://cloud.google.com/storage/pricing",
        "via": "https://raw.githubusercontent.com/api-evangelist/gcp-cloud-storage/refs/heads/main/plans/gcp-cloud-storage-plans-pricing.yml (a transcription of the page, 2026-09-20)",
        "read": "2026-12-07",
    },
    "logging_gib": {
        "usd": 0.50,
        "free": 50,
        "what": "Cloud Logging storage (ingestion), per GiB; first 50 GiB per project per month",
        "source": "https://cloud.google.com/stackdriver/pricing",
        "read": "2026-12-03",
    },
    "memorystore_standard_gb_hour": {
        "usd": 0.064,
        "free": 0,
        # The figure (issue 32), from public sources; no stored copy of the official page or a
        # transcription of it could be found to confirm it (searched 2026-12-07). M1 is 1-4 GB: larger
        # sizes are in other capacity tiers, whose price per GB was not read, so above 4 GB this is unconfirmed.
        "what": "Memorystore for Redis, Standard tier M1 (1-4 GB), us-central1, per GB-hour provisioned (not confirmed on the official page)",
        "source": "https://cloud.google.com/memorystore/docs/redis/pricing",
        "read": "2026-12-07",
    },
    "cloud_sql_db_g1_small_hour": {
        "usd": 0.035,
        "free": 0,
        # The figure (issue 32); the stored copies of the official page searched on 2026-12-07
        # did not show the shared-core rows, so it is not confirmed. Storage and backups are extra.
        "what": "Cloud SQL for PostgreSQL db-g1-small (MLflow's store), per hour (not confirmed on the official page)",
        "source": "https://cloud.google.com/sql/pricing",
        "read": "2026-12-07",
    },
}
# Pub/Sub bills at least this many bytes per publish, push or pull request (the pricing page).
PUBSUB_MIN_REQUEST_BYTES = 1000
# Memorystore for Redis: the largest primary (the tiers page, https://cloud.google.com/memorystore/docs/redis/redis-tiers).
MEMORYSTORE_MAX_PRIMARY_GB = 300
# Cloud Run writes one request log entry (run.googleapis.com/requests) for every request it serves, into the
# _Default bucket, billed as ingestion. Its size is an assumption of this model, not measured (no Cloud Run
# here): an entry carries the httpRequest fields, the resource's labels, trace and timestamps, about 1 KB.
REQUEST_LOG_ENTRY_BYTES = 1000
# The requests a ride makes: the backend's POST, a long poll (one, when the final comes within its wait)
# and the outcome's POST; the function's push, once per scorer.
BACKEND_REQUESTS_PER_RIDE = 3
INFRA, BACKEND_DOCKERFILE = REPO / "infra", REPO / "backend" / "Dockerfile"


@lru_cache(maxsize=1)
def deployed() -> dict:
    """What infra/ and backend/Dockerfile set, parsed (python-hcl2; the Dockerfile's ENV): the Memorystore
    size's default, the memory alert's threshold, the backend's request concurrency and its threads."""
    import hcl2
    from dockerfile_parse import DockerfileParser

    from devstack.access.grants import clean_hcl, load_resources

    with open(INFRA / "variables.tf") as f:
        variables = {name: body for block in clean_hcl(hcl2.load(f))["variable"] for name, body in block.items()}
    resources = load_resources(INFRA)
    alert = resources["google_monitoring_alert_policy"]["result_store_memory"]["conditions"][0]["condition_threshold"][0]
    backend = resources["google_cloud_run_v2_service"]["backend"]["template"][0]
    args = DockerfileParser(path=str(BACKEND_DOCKERFILE)).envs.get("GUNICORN_CMD_ARGS", "").split()
    gunicorn = dict(zip(args[::2], args[1::2], strict=False))
    return {
        "memorystore_gb": float(variables["memorystore_size_gb"]["default"]),
        "memory_alert_ratio": float(alert["threshold_value"]),
        "backend_concurrency": int(backend["max_instance_request_concurrency"]),
        "backend_threads": int(gunicorn.get("--threads", 1)),
        "backend_worker_class": gunicorn.get("--worker-class", "sync"),
        "backend_workers": int(DockerfileParser(path=str(BACKEND_DOCKERFILE)).envs.get("WEB_CONCURRENCY", 1)),
    }


@dataclass(frozen=True)
class Deployment:
    """What infra/ deploys (tests/test_capacity.py ties these to infra/main.tf; the result store's size,
    its alert and the backend's concurrency are parsed from infra/ itself)."""

    function_cpu: float = 1.0
    function_memory_gib: float = 1.0
    function_concurrency: int = 16
    function_min_instances: int = 0
    # Per revision: production's and the shadow's (a revision of the same service) each scale to it.
    function_max_instances: int = 20
    backend_cpu: float = 1.0
    backend_memory_gib: float = 0.5
    backend_min_instances: int = 1
    backend_max_instances: int = 10
    backend_concurrency: int = field(default_factory=lambda: deployed()["backend_concurrency"])
    controller_cpu: float = 1.0
    controller_memory_gib: float = 1.0
    # How busy an instance's CPU may run before another is needed. An assumption of this model, not a
    # platform figure: it leaves room for bursts and for the per-instance threads (pulls, resends).
    cpu_utilization: float = 0.6
    # Cloud Run's default concurrency target: it adds instances to keep each at 60 % of its maximum
    # concurrent requests (https://docs.cloud.google.com/run/docs/configuring/scaling-controls, read 2026-12-07).
    concurrency_utilization: float = 0.6
    # A rider's long poll (GET /rides/<id>?wait=N) is held until the final or MAX_WAIT_SECONDS. In a
    # backlog every rider's poll is held its whole wait; when finals come in time, about a second (an
    # assumption: the local stack's p99 from POST to final is 0.2 s, the cloud adds hops).
    backlog_hold_seconds: float = 10.0
    steady_hold_seconds: float = 1.0
    memorystore_gb: float = field(default_factory=lambda: deployed()["memorystore_gb"])
    memory_alert_ratio: float = field(default_factory=lambda: deployed()["memory_alert_ratio"])
    # A challenger in shadow scores every ride too (the push topic's second subscription).
    shadow: bool = True
    # The function's prediction lines also in the _Default log bucket (infra/: prediction_logs_in_default_bucket).
    prediction_logs_in_default_bucket: bool = False
    # Deliveries per topic: one per subscription (infra/main.tf; the test counts them).
    deliveries: dict[str, int] = field(default_factory=lambda: {"push": 2, "pull": 2, "shadow": 2, "outcomes": 2})
    # Of those, the Cloud Storage subscriptions (priced apart, with no free tier).
    storage_deliveries: dict[str, int] = field(default_factory=lambda: {"outcomes": 1})


@dataclass(frozen=True)
class PerRide:
    """One ride's costs, as measured (``measure``)."""

    function_cpu_ms: float
    backend_request_cpu_ms: float
    listener_cpu_ms: float
    redis_commands: float
    redis_network_bytes: float
    redis_memory_bytes: float  # held per ride while its record lives
    record_ttl_seconds: float
    topic_bytes: dict[str, float]  # mean billable message size per topic (data, attributes, timestamp, id)
    topic_messages: dict[str, float]  # messages per ride per topic
    # Bytes logged per ride: "predictions", the function's prediction lines (the prediction-log sink's,
    # kept out of the _Default bucket by default), "function", its other lines, and each backend's.
    log_bytes: dict[str, float]
    redis_cpu_ms: float  # Redis's own CPU per ride (INFO cpu) beyond its idle CPU: it runs commands on one thread
    redis_commands_by_name: dict[str, float] = field(default_factory=dict)  # where the commands per ride go
    # The shadow challenger's CPU per ride, for comparison: the model counts ``function_cpu_ms`` per scorer.
    challenger_cpu_ms: float | None = None


# The per-ride figures of the last full measurement (docs/capacity.md: 1,000 real rides, 2026-12-03), with
# the record's TTL as the backend now sets it: what the defaults are checked against without measuring
# again (``python benchmarks/capacity.py`` measures afresh and prints its own).
MEASURED_PER_RIDE = PerRide(
    function_cpu_ms=4.16, challenger_cpu_ms=4.17, backend_request_cpu_ms=7.42, listener_cpu_ms=1.92, redis_cpu_ms=0.90,
    redis_commands=49, redis_network_bytes=12_300, redis_memory_bytes=1_700, record_ttl_seconds=DEFAULT_RESULT_TTL_SECONDS,
    topic_bytes={"push": 200, "pull": 363, "outcomes": 568}, topic_messages={"push": 1.0, "pull": 1.0, "outcomes": 1.0},
    log_bytes={"predictions": 453, "function": 0, "backend-0": 392},
)  # fmt: skip


def _cost(name: str, quantity: float) -> float | None:
    price = PRICES[name]
    if price["usd"] is None:
        return None
    return max(0.0, quantity - price["free"]) * price["usd"]


def _priced(costs: dict[str, float | None]) -> dict:
    """What the costs come to: the priced ones (rounded) and their total, and the names of those unpriced."""
    priced = {name: round(usd, 2) for name, usd in costs.items() if usd is not None}
    return {
        "cost_usd_per_month": priced,
        "unpriced": sorted(name for name, usd in costs.items() if usd is None),
        "priced_total_usd_per_month": round(sum(priced.values()), 2),
    }


def pubsub_billable_bytes(message_bytes: float, deliveries: int, batched_pull: bool = True) -> float:
    """Billable bytes of one message: its publish (one per request: the backend and the function publish
    each answer as it comes) and each delivery; a push delivery is one request per message, and a pull
    delivers batches, so only its push and publish pay the 1,000-byte minimum."""
    publish = max(message_bytes, PUBSUB_MIN_REQUEST_BYTES)
    delivery = message_bytes if batched_pull else max(message_bytes, PUBSUB_MIN_REQUEST_BYTES)
    return publish + deliveries * delivery


def redis_memory_gb(per_ride: PerRide, rate: float, seconds: float = 86_400) -> float:
    """GB the result store holds after ``seconds`` at ``rate``: each ride's record until its TTL."""
    return rate * min(per_ride.record_ttl_seconds, seconds) * per_ride.redis_memory_bytes / 1e9


def memory_alert_rate(per_ride: PerRide, deployment: Deployment) -> float:
    """The sustained rides/s at which the deployed result store reaches its memory alert."""
    return (
        deployment.memorystore_gb
        * deployment.memory_alert_ratio
        * 1e9
        / (per_ride.record_ttl_seconds * per_ride.redis_memory_bytes)
    )


def backend_instances(per_ride: PerRide, rate: float, deployment: Deployment, hold_seconds: float) -> dict:
    """The backend instances ``rate`` needs: for its CPU, and for its requests held at once (each
    rider's long poll held ``hold_seconds``), at Cloud Run's targets for each; the larger binds."""
    busy = rate * (per_ride.backend_request_cpu_ms + per_ride.listener_cpu_ms) / 1000
    held = rate * hold_seconds
    for_cpu = math.ceil(round(busy / (deployment.backend_cpu * deployment.cpu_utilization), 9))
    for_requests = math.ceil(round(held / (deployment.backend_concurrency * deployment.concurrency_utilization), 9))
    return {
        "requests_held": round(held),
        "for_cpu": for_cpu,
        "for_requests": for_requests,
        "instances": max(deployment.backend_min_instances, for_cpu, for_requests),
    }


def capacity_model(per_ride: PerRide, rate: float, deployment: Deployment | None = None) -> dict:
    """The deployment at ``rate`` rides/s, sustained for a month: instances, Redis, Pub/Sub, logs, cost."""
    deployment = deployment or Deployment()
    month_rides = rate * SECONDS_PER_MONTH
    scorers = 2 if deployment.shadow else 1
    # Production and the shadow are revisions of one service; each scales on its own to its maximum.
    per_revision = math.ceil(
        round(rate * per_ride.function_cpu_ms / 1000 / (deployment.function_cpu * deployment.cpu_utilization), 9)
    )
    function_instances = per_revision * scorers
    steady = backend_instances(per_ride, rate, deployment, deployment.steady_hold_seconds)
    backlog = backend_instances(per_ride, rate, deployment, deployment.backlog_hold_seconds)
    redis_ops = rate * per_ride.redis_commands
    redis_busy = rate * per_ride.redis_cpu_ms / 1000  # of Redis's one command thread
    redis_gb = redis_memory_gb(per_ride, rate)
    memorystore_gb = max(deployment.memorystore_gb, math.ceil(redis_gb / deployment.memory_alert_ratio))

    topics = dict(per_ride.topic_bytes)
    if deployment.shadow:
        topics["shadow"] = per_ride.topic_bytes["pull"]  # the shadow's answers: the same message as a final
    basic_bytes, storage_subscription_bytes = {}, 0.0
    for topic, size in topics.items():
        messages = rate * per_ride.topic_messages.get(topic, 1.0)
        to_storage = deployment.storage_deliveries.get(topic, 0)
        deliveries = deployment.deliveries[topic] - to_storage
        basic_bytes[topic] = messages * pubsub_billable_bytes(size, deliveries, batched_pull=topic != "push")
        storage_subscription_bytes += messages * to_storage * size
    pubsub_tib_month = sum(basic_bytes.values()) * SECONDS_PER_MONTH / TIB
    storage_subscription_tib_month = storage_subscription_bytes * SECONDS_PER_MONTH / TIB
    # Each scorer (production, and the challenger in shadow) logs its own lines. What reaches the
    # _Default bucket is billed as ingestion; the prediction lines go to their bucket (the Log Router
    # is free) unless the deployment keeps them in _Default too. Cloud Run adds its request log entries.
    ingested = {
        name: size * (scorers if name in ("function", "predictions") else 1)
        for name, size in per_ride.log_bytes.items()
        if name != "predictions" or deployment.prediction_logs_in_default_bucket
    }
    request_log_bytes = (BACKEND_REQUESTS_PER_RIDE + scorers) * REQUEST_LOG_ENTRY_BYTES
    logging_gib_month = rate * (sum(ingested.values()) + request_log_bytes) * SECONDS_PER_MONTH / GIB
    prediction_log_gib_month = rate * per_ride.log_bytes.get("predictions", 0) * scorers * SECONDS_PER_MONTH / GIB
    # Files added to Cloud Storage each month: the completed rides (the Cloud Storage subscription) and
    # the prediction lines (the sink's bucket); each month's files cost this for every month they are kept.
    storage_gib_month = storage_subscription_tib_month * TIB / GIB + prediction_log_gib_month

    # The function bills request time; at a steady stream its instances are busy all the time, so the
    # billed instance-seconds are the instances' seconds.
    function_seconds = function_instances * SECONDS_PER_MONTH
    backend_seconds = steady["instances"] * SECONDS_PER_MONTH
    costs = {
        "function_cpu": _cost("run_request_vcpu_second", function_seconds * deployment.function_cpu),
        "function_memory": _cost("run_request_gib_second", function_seconds * deployment.function_memory_gib),
        "function_requests": _cost("run_requests_million", month_rides * scorers / 1e6),
        "backend_cpu": _cost("run_instance_vcpu_second", backend_seconds * deployment.backend_cpu),
        "backend_memory": _cost("run_instance_gib_second", backend_seconds * deployment.backend_memory_gib),
        "pubsub": _cost("pubsub_tib", pubsub_tib_month),
        "pubsub_storage_subscription": _cost("pubsub_storage_subscription_tib", storage_subscription_tib_month),
        "logging": _cost("logging_gib", logging_gib_month),
        "storage_month_of_files": _cost("storage_standard_gib_month", storage_gib_month),
        "memorystore": _cost("memorystore_standard_gb_hour", memorystore_gb * HOURS_PER_MONTH),
    }
    summary = _priced(costs)
    found = limits(
        {
            "per_revision": per_revision,
            "backend": backlog,
            "redis_ops": redis_ops,
            "redis_busy": redis_busy,
            "redis_gb": redis_gb,
        },
        per_ride,
        deployment,
    )
    return {
        "rides_per_second": rate,
        "rides_per_month": round(month_rides),
        "function_instances_per_revision": per_revision,
        "function_instances": function_instances,
        "backend_instances": steady["instances"],
        "backend_in_a_backlog": backlog,
        "redis_ops_per_second": round(redis_ops),
        "redis_thread_busy": round(redis_busy, 2),
        "redis_memory_gb": round(redis_gb, 2),
        "redis_memory_share_of_deployed": round(redis_gb / deployment.memorystore_gb, 2),
        "memorystore_gb_billed": memorystore_gb,
        "pubsub_tib_per_month": round(pubsub_tib_month, 3),
        "pubsub_storage_subscription_tib_per_month": round(storage_subscription_tib_month, 3),
        "logging_gib_per_month": round(logging_gib_month, 1),
        "prediction_log_gib_per_month": round(prediction_log_gib_month, 1),
        "storage_gib_added_per_month": round(storage_gib_month, 1),
        **summary,
        "priced_usd_per_million_rides": round(summary["priced_total_usd_per_month"] / (month_rides / 1e6), 2),
        "limits": found,
        "first_bottleneck": found[0]["limit"],
    }


def limits(load: dict, per_ride: PerRide, deployment: Deployment) -> list[dict]:
    """Each limit modelled, as the share of it this rate uses, the nearest to breaking first; a share
    above 1 is broken, and says what to do. ``load``: the function's instances per revision, the
    backend's in a backlog, Redis's commands/s, its thread's load and the GB it holds."""
    backend = load["backend"]
    binding = "requests held" if backend["for_requests"] >= backend["for_cpu"] else "CPU"
    alert_gb = deployment.memorystore_gb * deployment.memory_alert_ratio
    shares = [
        (
            load["per_revision"] / deployment.function_max_instances,
            f"function instances: {load['per_revision']} per revision (production; the shadow as many) of "
            f"max_instance_count {deployment.function_max_instances}",
            "raise max_instance_count (and the project's Cloud Run quota), or score rides in batches",
        ),
        (
            backend["instances"] / deployment.backend_max_instances,
            f"backend instances in a backlog: {backend['instances']} of max_instance_count "
            f"{deployment.backend_max_instances} ({binding}: {backend['requests_held']:,} long polls held "
            f"{deployment.backlog_hold_seconds:g} s at concurrency {deployment.backend_concurrency}; CPU {backend['for_cpu']})",
            "raise max_instance_count, or threads with max_instance_request_concurrency together",
        ),
        (
            load["redis_busy"] / deployment.cpu_utilization,
            f"redis: {load['redis_ops']:,.0f} commands/s keep its one command thread {load['redis_busy']:.0%} busy "
            f"(of {deployment.cpu_utilization:.0%})",
            "Memorystore for Redis Cluster, sharded by ride_id; or fewer round trips per ride",
        ),
        (
            load["redis_gb"] / alert_gb,
            f"redis memory: {load['redis_gb']:,.2f} GB held ({per_ride.record_ttl_seconds / 3600:g} h TTL) of the "
            f"{alert_gb:g} GB at which the alert fires ({deployment.memory_alert_ratio:.0%} of memorystore_size_gb "
            f"{deployment.memorystore_gb:g})",
            f"raise memorystore_size_gb (largest primary: {MEMORYSTORE_MAX_PRIMARY_GB} GB), or shard",
        ),
    ]
    return [
        {"limit": what, "share": round(share, 2), **({"fix": fix} if share > 1 else {})}
        for share, what, fix in sorted(shares, reverse=True)
    ]


def idle_cost(deployment: Deployment | None = None) -> dict:
    """A month with no rides: what stays on (the backend's minimum instance, the rollout controller, the
    deployed Memorystore instance, MLflow's Cloud SQL). The function and MLflow's server scale to zero."""
    deployment = deployment or Deployment()
    seconds = SECONDS_PER_MONTH
    costs = {
        "backend_min_instance_cpu": _cost(
            "run_instance_vcpu_second", deployment.backend_min_instances * seconds * deployment.backend_cpu
        ),
        "backend_min_instance_memory": _cost(
            "run_instance_gib_second", deployment.backend_min_instances * seconds * deployment.backend_memory_gib
        ),
        "controller_cpu": _cost("run_instance_vcpu_second", seconds * deployment.controller_cpu),
        "controller_memory": _cost("run_instance_gib_second", seconds * deployment.controller_memory_gib),
        "memorystore": _cost("memorystore_standard_gb_hour", deployment.memorystore_gb * HOURS_PER_MONTH),
        "cloud_sql": _cost("cloud_sql_db_g1_small_hour", HOURS_PER_MONTH),
    }
    return _priced(costs)


def defaults_at_the_claimed_rate(per_ride: PerRide, deployment: Deployment | None = None) -> dict:
    """Whether the defaults hold DEFAULT_MAX_RIDES_PER_SECOND: the result store after a day of it, the
    rate at which its alert fires, and the backend's instances in a backlog, each beside its bound."""
    deployment = deployment or Deployment()
    rate = DEFAULT_MAX_RIDES_PER_SECOND
    held = redis_memory_gb(per_ride, rate)
    backlog = backend_instances(per_ride, rate, deployment, deployment.backlog_hold_seconds)
    return {
        "rides_per_second": rate,
        "redis_gb_after_a_day": round(held, 2),
        "redis_gb_at_the_alert": round(deployment.memorystore_gb * deployment.memory_alert_ratio, 2),
        "memorystore_gb": deployment.memorystore_gb,
        "memory_alert_fires_at_rides_per_second": round(memory_alert_rate(per_ride, deployment), 1),
        "backend_instances_in_a_backlog": backlog["instances"],
        "backend_max_instances": deployment.backend_max_instances,
        "holds": held <= deployment.memorystore_gb * deployment.memory_alert_ratio
        and backlog["instances"] <= deployment.backend_max_instances,
    }


# --- a burst: the step from 10 to 1,000 rides/s -------------------------------------------------------
# Cloud Run's autoscaler as its page describes it (https://docs.cloud.google.com/run/docs/about-instance-autoscaling,
# read 2026-12-03): metrics-based scaling averages each instance's CPU use over one minute and asks for
# enough instances to keep it at 60 %; an earlier copy of the page says it evaluates every 5 seconds
# (the current one, "periodically"); with no instance free, a request waits up to 10 seconds (at least
# 3.5 times the service's average start-up time, the current copy), then fails with 429. The page also
# names on-demand scaling, without saying how fast it acts: so the burst is modelled twice, with the
# one-minute CPU average alone (the slowest the page allows) and with the new demand seen at the first
# evaluation (the fastest), and riders' waits lie between. The instance's start is the process start
# measured here (``Starts``): the platform's own share (scheduling, the image) is not given on the pages read.
AUTOSCALER_CPU_TARGET = 0.6
AUTOSCALER_CPU_WINDOW_SECONDS = 60
AUTOSCALER_EVALUATION_SECONDS = 5
REQUEST_QUEUE_SECONDS = 10
BURST_FROM, BURST_TO = 10, 1_000


@dataclass(frozen=True)
class Starts:
    """Process start to answering, measured on the local stack (a Cloud Run instance's start, less the platform's share)."""

    function_seconds: float
    backend_seconds: float


@dataclass(frozen=True)
class ScaledService:
    """One Cloud Run service in a burst: the CPU a ride costs it, its instance size and start, its bounds."""

    name: str
    cpu_ms_per_ride: float
    cpu: float
    start_seconds: float
    min_instances: int
    max_instances: int

    def wanted(self, busy_vcpu: float) -> int:
        """The instances that keep this CPU use at the autoscaler's target."""
        return math.ceil(round(busy_vcpu / (self.cpu * AUTOSCALER_CPU_TARGET), 9))

    def instances_for(self, busy_vcpu: float) -> int:
        """What the autoscaler asks for at this CPU use, within the service's bounds."""
        return max(self.min_instances, min(self.max_instances, self.wanted(busy_vcpu)))


def simulate_step(
    service: ScaledService,
    before: float,
    after: float,
    on_demand: bool,
    queue_seconds: float | None = None,
    seconds: float = 900,
    dt: float = 0.1,
) -> dict:
    """The service at ``before`` rides/s, stepped to ``after`` at t=0: its instances, the backlog of rides
    waiting for one, and each ride's wait (first come, first served). ``on_demand``: the autoscaler sees
    the new demand at its first evaluation; otherwise, the CPU used averaged over its one-minute window.
    Instances asked for serve ``start_seconds`` later; the count never shrinks within the burst.
    ``queue_seconds``: a ride waiting longer is refused (Cloud Run's 429 to an HTTP request); None:
    rides wait as long as it takes (a push subscription keeps its messages)."""
    per_instance = service.cpu * 1000 / service.cpu_ms_per_ride  # rides/s with its CPU fully busy
    steps, evaluate_every = round(seconds / dt), round(AUTOSCALER_EVALUATION_SECONDS / dt)
    window_steps = round(AUTOSCALER_CPU_WINDOW_SECONDS / dt)
    ready = service.instances_for(before * service.cpu_ms_per_ride / 1000)
    instances_before = ready
    window = deque([before * service.cpu_ms_per_ride / 1000] * window_steps, maxlen=window_steps)
    starting: list[float] = []  # when each instance asked for serves
    needed = service.instances_for(after * service.cpu_ms_per_ride / 1000)
    queue: deque[list[float]] = deque()  # [the step they came in, rides still waiting], oldest first
    backlog = refused = max_backlog = 0.0
    waited: list[tuple[float, float]] = []  # (seconds waited, rides): each share of a step's arrivals served
    scaled_out = drained = None
    for step in range(steps):
        now = step * dt
        ready += sum(1 for at in starting if at <= now + 1e-9)
        starting = [at for at in starting if at > now + 1e-9]
        if scaled_out is None and ready >= needed:
            scaled_out = now
        if step % evaluate_every == 0:
            busy = after * service.cpu_ms_per_ride / 1000 if on_demand else sum(window) / window_steps
            starting += [now + service.start_seconds] * max(0, service.instances_for(busy) - ready - len(starting))
        queue.append([step, after * dt])
        backlog += after * dt
        while queue_seconds is not None and queue and (step - queue[0][0]) * dt > queue_seconds + 1e-9:
            gone = queue.popleft()[1]
            refused, backlog = refused + gone, backlog - gone
        budget = ready * per_instance * dt
        while queue and budget > 1e-9:
            take = min(budget, queue[0][1])
            waited.append(((step - queue[0][0]) * dt, take))
            queue[0][1] -= take
            budget, backlog = budget - take, backlog - take
            if queue[0][1] <= 1e-9:
                queue.popleft()
        window.append((ready * per_instance * dt - budget) * service.cpu_ms_per_ride / 1000 / dt)
        if backlog > max_backlog + 1e-9:
            max_backlog, drained = backlog, None  # a new peak: not drained since
        elif drained is None and max_backlog > 0 and backlog <= 1e-6:
            drained = now
    most = service.max_instances * per_instance  # rides/s at its maximum instances, CPU fully busy
    if backlog > 1e-6 and after <= most:
        raise ValueError(f"{service.name}: {backlog:.0f} rides still waiting after {seconds:.0f} s; simulate longer")

    def rides_waiting_over(limit: float) -> int:
        return round(sum(rides for wait, rides in waited if wait > limit + 1e-9))

    return {
        "service": service.name,
        "autoscaler": "on-demand (the new demand seen at once)" if on_demand else "CPU averaged over one minute",
        "instances_before": instances_before,
        "instances_needed": needed,
        "capped_at_max_instances": service.wanted(after * service.cpu_ms_per_ride / 1000) > service.max_instances,
        # False: even its maximum instances, CPU fully busy, serve fewer rides/s than come.
        "keeps_up": after <= most,
        "most_rides_per_second": round(most),
        "scaled_out_after_seconds": None if scaled_out is None else round(scaled_out, 1),
        "max_backlog_rides": round(max_backlog),
        "backlog_drained_after_seconds": None if drained is None else round(drained, 1),
        "max_wait_seconds": round(max(wait for wait, _ in waited), 1),
        "rides_waiting_over_1_s": rides_waiting_over(1),
        "rides_refused": round(refused),
        "rides_still_waiting_at_the_end": round(backlog),
        "_rides_waiting_over": rides_waiting_over,
    }


def burst(
    per_ride: PerRide, starts: Starts, resend_after: float, final_bound: float, deployment: Deployment | None = None
) -> dict:
    """The step from BURST_FROM to BURST_TO rides/s, on the production function (riders wait for its
    final; the shadow's service scales the same way, and nobody waits for it) and on the backend
    (riders wait for its coarse estimate), each under both bounds of the autoscaler."""
    deployment = deployment or Deployment()
    function = ScaledService(
        "function",
        per_ride.function_cpu_ms,
        deployment.function_cpu,
        starts.function_seconds,
        deployment.function_min_instances,
        deployment.function_max_instances,
    )
    backend = ScaledService(
        "backend",
        per_ride.backend_request_cpu_ms + per_ride.listener_cpu_ms,
        deployment.backend_cpu,
        starts.backend_seconds,
        deployment.backend_min_instances,
        deployment.backend_max_instances,
    )
    runs = []
    for on_demand in (True, False):
        # Rides wait in the push subscription for the function; a POST waits for the backend at most
        # REQUEST_QUEUE_SECONDS, then is refused (429) and retried by its client.
        final = simulate_step(function, BURST_FROM, BURST_TO, on_demand)
        # A final later than RESEND_AFTER_SECONDS makes the backend publish the ride again (more load
        # for the function, not modelled); later than the final bound, the ride is marked failed, and
        # its rider keeps the coarse estimate.
        final["rides_resent"] = final["_rides_waiting_over"](resend_after)
        final["rides_failed"] = final["_rides_waiting_over"](final_bound)
        coarse = simulate_step(backend, BURST_FROM, BURST_TO, on_demand, queue_seconds=REQUEST_QUEUE_SECONDS)
        runs += [{key: value for key, value in run.items() if not key.startswith("_")} for run in (final, coarse)]
    return {"from_rides_per_second": BURST_FROM, "to_rides_per_second": BURST_TO, "starts": asdict(starts), "runs": runs}


# --- measurement on the local stack -----------------------------------------------------------------
MEASURED_TOPICS = ("push", "pull", "outcomes")


def _drain(subscriber, path: str) -> tuple[int, int]:
    """(messages, billable bytes: data, attributes, timestamp and id) left on a subscription, acknowledged as read."""
    messages = size = 0
    while True:
        response = subscriber.pull(request={"subscription": path, "max_messages": 1000}, timeout=10)
        if not response.received_messages:
            return messages, size
        for received in response.received_messages:
            message = received.message
            messages += 1
            size += len(message.data) + sum(len(k) + len(v) for k, v in message.attributes.items())
            size += 20 + len(message.message_id)  # the timestamp and the message_id count too (the pricing page)
        subscriber.acknowledge(request={"subscription": path, "ack_ids": [r.ack_id for r in response.received_messages]})


def _redis_figures(client) -> dict[str, float]:
    """Redis's counters (INFO) the per-ride figures are differences of."""
    commands = client.info("commandstats")
    stats = client.info("stats")
    cpu = client.info("cpu")
    return {
        **{f"cmd:{name.removeprefix('cmdstat_')}": entry["calls"] for name, entry in commands.items()},
        "commands": sum(entry["calls"] for entry in commands.values()),
        "connections": stats["total_connections_received"],
        "network_bytes": stats["total_net_input_bytes"] + stats["total_net_output_bytes"],
        "memory_bytes": client.info("memory")["used_memory"],
        "cpu_seconds": cpu["used_cpu_user"] + cpu["used_cpu_sys"],
    }


def redis_idle_cpu(client, seconds: float = 5.0) -> float:
    """Redis's CPU-seconds per second with the stack up and no rides (its own cron, the backend's
    resend sweeps): what a ride's share must not include."""
    before, started = _redis_figures(client)["cpu_seconds"], time.perf_counter()
    time.sleep(seconds)
    return (_redis_figures(client)["cpu_seconds"] - before) / (time.perf_counter() - started)


def _redis_cost_per_ride(client, rides: int, run, idle_cpu: float) -> dict:
    """What ``run()``, doing ``rides`` rides, cost Redis per ride beyond its idle CPU (and this
    process's CPU per ride: the client's side, the backend's in production)."""
    before, cpu_before, started = _redis_figures(client), time.process_time(), time.perf_counter()
    run()
    after, cpu_after, elapsed = _redis_figures(client), time.process_time(), time.perf_counter() - started
    redis_cpu = after["cpu_seconds"] - before["cpu_seconds"] - idle_cpu * elapsed
    return {
        "connections_per_ride": round((after["connections"] - before["connections"]) / rides, 3),
        "commands_per_ride": round((after["commands"] - before["commands"]) / rides, 2),
        "redis_cpu_ms_per_ride": round(redis_cpu * 1000 / rides, 4),
        "client_cpu_ms_per_ride": round((cpu_after - cpu_before) * 1000 / rides, 4),
    }


def _before_after(client, variants: dict, rides_of, rides: int, idle_cpu: float, rounds: int = 3) -> dict:
    """The two variants (name: store), ``rides_of(store, prefix)`` each, alternating for ``rounds``
    rounds on the same Redis (so a slow spell of the machine falls on both): the median of each
    figure, what the second saves per ride, and the rides lost (none: every ride is checked)."""
    from statistics import median

    samples: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(rounds):
        for name, store in variants.items():
            samples[name].append(_redis_cost_per_ride(client, rides, partial(rides_of, store, f"{round_}-"), idle_cpu))
    figures = {name: {key: round(median(run[key] for run in runs), 4) for key in runs[0]} for name, runs in samples.items()}
    before, after = figures.values()
    return {
        **figures,
        "redis_cpu_ms_saved_per_ride": round(before["redis_cpu_ms_per_ride"] - after["redis_cpu_ms_per_ride"], 4),
        "client_cpu_ms_saved_per_ride": round(before["client_cpu_ms_per_ride"] - after["client_cpu_ms_per_ride"], 4),
        "rides": rides,
        "rounds": rounds,
        "lost": 0,
    }


def _long_polled_rides(store, prefix: str, rides: int) -> None:
    """Each ride recorded, waited for, and answered while it waits."""
    import threading

    for index in range(rides):
        ride_id = f"{prefix}r{index}"
        store.create(ride_id, {"ride_id": ride_id, "status": "pending", "fingerprint": "f"}, resend_at=time.time() + 600)
        answer = {"ride_id": ride_id, "duration_final": 9.0, "ride_fingerprint": "f", "model_run_id": "capacity"}
        timer = threading.Timer(0.002, store.complete, (ride_id, answer))
        timer.start()
        if store.wait(ride_id, timeout=5)["status"] != "done":
            raise RuntimeError(f"ride {ride_id} was not answered within its wait")
        timer.join()


def wait_connections_before_after(redis_url: str, idle_cpu: float, rides: int = 300) -> dict:
    """The long poll's Redis cost per ride, a connection per wait (before) against reused ones (after)."""
    import redis

    from backend.results import RedisResultStore

    variants = {
        name: RedisResultStore(redis_url, ttl_seconds=600, prefix=f"capacity-{name}", reuse_wait_connections=reuse)
        for name, reuse in (("connection_per_wait", False), ("reused_connections", True))
    }
    rides_of = partial(_long_polled_rides, rides=rides)
    return _before_after(redis.Redis.from_url(redis_url), variants, rides_of, rides, idle_cpu)


def _updated_ride(store, real: dict, ride_id: str) -> None:
    """A ride recorded and published, then its updates as the backend makes them (its final, the
    shadow's answer, its outcome, the outcome's publish), each checked; ``real``: a streamed ride's record."""
    asked = ("duration_coarse", "ride", "fingerprint", "requested_at")  # what the POST records
    store.create(ride_id, {"ride_id": ride_id, "status": "pending", **{k: real[k] for k in asked}}, resend_at=time.time() + 600)
    store.published(ride_id, resend_at=time.time() + 600)
    final = {k: real[k] for k in ("duration_final", "duration_low", "duration_high", "model_run_id", "model_version")}
    answered = {"ride_id": ride_id, **final, "ride_fingerprint": real["fingerprint"]}
    shadow = {**answered, "model_version": f"{real['model_version']}-shadow"}
    if (store.complete(ride_id, answered), store.add_shadow(ride_id, shadow)) != ("stored", "stored"):
        raise RuntimeError(f"ride {ride_id}'s answers were not stored")
    if store.record_outcome(ride_id, real["actual_minutes"], time.time())[0] != "recorded":
        raise RuntimeError(f"ride {ride_id}'s outcome was not recorded")
    store.outcome_published(ride_id)
    if not store.get(ride_id)["outcome_published"]:
        raise RuntimeError(f"ride {ride_id} lost an update")


def _updated_rides(store, prefix: str, records: list[dict], rides: int, concurrency: int) -> None:
    """``rides`` rides through ``_updated_ride``, ``concurrency`` at a time (as the backend's threads
    serve them: Redis then answers several clients per wake-up, as in the stream)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(concurrency) as pool:
        reals = (records[index % len(records)] for index in range(rides))
        list(pool.map(partial(_updated_ride, store), reals, (f"{prefix}r{index}" for index in range(rides))))


def updates_before_after(redis_url: str, records: list[dict], idle_cpu: float, rides: int = 1000, concurrency: int = 16) -> dict:
    """A ride's updates as WATCH/MULTI/EXEC transactions (before) against the compare-and-set script
    (after), on copies of real rides' records from the stream, ``concurrency`` rides at a time."""
    import redis

    from backend.results import RedisResultStore

    variants = {
        name: RedisResultStore(redis_url, ttl_seconds=600, prefix=f"capacity-{name}", scripted_updates=scripted)
        for name, scripted in (("transactions", False), ("script", True))
    }
    rides_of = partial(_updated_rides, records=records, rides=rides, concurrency=concurrency)
    return {**_before_after(redis.Redis.from_url(redis_url), variants, rides_of, rides, idle_cpu), "concurrency": concurrency}


def _logged_bytes(logs: dict[str, Path], before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The bytes each log file grew by between two readings, the function's prediction lines apart."""
    logged = {}
    for name, path in logs.items():
        with path.open("rb") as log_file:
            log_file.seek(before[name])
            lines = log_file.read(after[name] - before[name]).splitlines(keepends=True)
        if name == "function":
            predictions = [line for line in lines if _is_prediction_line(line)]
            logged["predictions"] = sum(map(len, predictions))
            lines = [line for line in lines if not _is_prediction_line(line)]
        logged[name] = sum(map(len, lines))
    return logged


def _is_prediction_line(line: bytes) -> bool:
    """One of the function's prediction lines (serving_function.prediction.log), which the sink files."""
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    return isinstance(entry, dict) and entry.get("message") == "prediction"


def measure(rides: int, concurrency: int) -> tuple[PerRide, dict, Starts]:
    """The per-ride costs of a stream of real rides, the fixes' before/after on the same Redis, and how
    long the function and the backend took to start."""
    import redis
    import requests

    from backend.settings import BackendSettings
    from devstack.pubsub import ensure_subscription, subscriber_client
    from devstack.stack import ARTIFACT_ROOT, PROJECT, TOPICS, Stack
    from devstack.traffic import OutcomeReporter, real_rides, stream, summarize
    from devstack.usage import cpu_seconds
    from training.settings import Settings
    from training.train import TrainConfig, train

    with tempfile.TemporaryDirectory(prefix="capacity-") as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.start_emulators()
            stack.ensure_topology()
            redis_url = stack.start_redis()
            store = redis.Redis.from_url(redis_url)
            # Persistence as infra/ deploys Memorystore (RDB snapshots hourly, no append-only file):
            # the stack's AOF, kept for its fault tests, would bill Redis's thread for writes
            # production does not make.
            store.config_set("appendonly", "no")
            store.config_set("save", "3600 1")
            stack.apply_env()
            model = train(
                TrainConfig(trials=1, sample=20_000, register=False),
                Settings(f"sqlite:///{tmp}/mlflow.db", "capacity", ARTIFACT_ROOT, "capacity", str(REPO / "data")),
            )
            started = time.perf_counter()
            stack.start_function(model.run_id, "1")  # returns once it answers, as function_bench's cold start
            function_start = time.perf_counter() - started
            # A challenger in shadow, as the default deployment runs: it scores every ride too, and
            # its answers reach the backend's second listener and each ride's record.
            stack.start_function(model.run_id, "1", key="challenger")
            started = time.perf_counter()
            stack.start_backends(1, redis_url)
            starts = Starts(round(function_start, 2), round(time.perf_counter() - started, 2))
            backend = stack.backend_urls[0]
            emulator = f"127.0.0.1:{stack.ports['pubsub']}"
            subscriber = subscriber_client(emulator)
            paths = {
                topic: ensure_subscription(PROJECT, TOPICS[topic], f"capacity-{topic}", emulator_host=emulator)
                for topic in MEASURED_TOPICS
            }
            traffic = real_rides(rides + 100, seed=3)
            stream(stack.backend_urls, traffic[:100], concurrency, report_outcomes=True)  # warm-up, not counted
            for path in paths.values():
                _drain(subscriber, path)
            logs = {name: stack.log_dir / f"{name}.log" for name in ("function", "backend-0")}

            def reading() -> dict:
                """Every counter the figures are differences of."""
                return {
                    "function": cpu_seconds(stack.pids["function"]),
                    "challenger": cpu_seconds(stack.pids["challenger"]),
                    "backend": cpu_seconds(stack.pids["backend-0"]),
                    "listener": requests.get(f"{backend}/readyz", timeout=10).json()["listener_cpu_seconds"],
                    "redis": _redis_figures(store),
                    "logs": {name: path.stat().st_size for name, path in logs.items()},
                }

            idle_cpu = redis_idle_cpu(store)
            before = reading()
            started = time.perf_counter()
            # Outcomes go back as the rides end (devstack.traffic), after the rate is measured; their cost is counted.
            reporter = OutcomeReporter()
            outcomes = stream(stack.backend_urls, traffic[100:], concurrency, report_outcomes=reporter)
            summary = summarize(outcomes, time.perf_counter() - started)
            reporter.close()
            time.sleep(1)  # the last outcomes' publishes
            after = reading()
            streamed_seconds = time.perf_counter() - started
            logged = _logged_bytes(logs, before["logs"], after["logs"])
            if summary["lost"]:
                raise RuntimeError(f"{summary['lost']} of {rides} rides lost: the figures would not be per ride")
            topics = {topic: _drain(subscriber, path) for topic, path in paths.items()}
            keys = [key for key, _ in zip(store.scan_iter("*:ride:*"), range(200), strict=False)]
            record_bytes = [store.memory_usage(key) for key in keys]
            # The fixes, each before and after on the same Redis, after the stream.
            fixes = {
                "redis_idle_cpu_seconds_per_second": round(idle_cpu, 5),
                "long_poll_connections": wait_connections_before_after(redis_url, idle_cpu),
                "scripted_updates": updates_before_after(
                    redis_url, [json.loads(store.get(key)) for key in keys], idle_cpu, concurrency=concurrency
                ),
            }
            ttl = store.ttl(keys[0])  # seconds left of the setting's TTL: a record lives RESULT_TTL_SECONDS
            configured_ttl = BackendSettings.from_env().result_ttl_seconds
            if not 0 < ttl <= configured_ttl:
                raise RuntimeError(f"a ride record's TTL is {ttl} s, not within the configured {configured_ttl} s")
        finally:
            stack.stop_all()
    log.info("measured %d rides: %s", rides, summary)
    delta = {name: after[name] - before[name] for name in ("function", "challenger", "backend", "listener")}
    redis_delta = {name: after["redis"][name] - before["redis"].get(name, 0) for name in after["redis"]}
    by_name = {name[4:]: round(calls / rides, 2) for name, calls in redis_delta.items() if name.startswith("cmd:") and calls}
    per_ride = PerRide(
        function_cpu_ms=round(delta["function"] * 1000 / rides, 3),
        challenger_cpu_ms=round(delta["challenger"] * 1000 / rides, 3),
        backend_request_cpu_ms=round((delta["backend"] - delta["listener"]) * 1000 / rides, 3),
        listener_cpu_ms=round(delta["listener"] * 1000 / rides, 3),
        redis_commands=round(redis_delta["commands"] / rides, 2),
        redis_network_bytes=round(redis_delta["network_bytes"] / rides),
        redis_memory_bytes=round(max(redis_delta["memory_bytes"] / rides, sum(record_bytes) / len(record_bytes))),
        record_ttl_seconds=float(configured_ttl),
        topic_bytes={topic: round(size / max(count, 1)) for topic, (count, size) in topics.items()},
        topic_messages={topic: round(count / rides, 3) for topic, (count, _) in topics.items()},
        log_bytes={name: round(size / rides) for name, size in logged.items()},
        redis_cpu_ms=round((redis_delta["cpu_seconds"] - idle_cpu * streamed_seconds) * 1000 / rides, 4),
        redis_commands_by_name=dict(sorted(by_name.items(), key=lambda item: -item[1])),
    )
    return per_ride, fixes, starts


# --- training at scale ------------------------------------------------------------------------------
# Cloud Run's largest instance: 8 vCPU with up to 32 GiB (the vCPU and memory table of
# https://docs.cloud.google.com/run/docs/configuring/instances/cpu, read 2026-12-03).
# A yellow-taxi month: about 3 million rides (the figure).
JOB_MAX_MEMORY_GIB = 32
YELLOW_MONTH_ROWS = 3_000_000


def fit_months(months: list[str]) -> dict:
    """Load ``months`` and fit the default model and its range's two quantile models on them, in this
    process (the parent runs it in a child of its own, so the peak memory is this fit's alone)."""
    from data import load_trips, month_uri
    from ride_contract.ride import RIDE_COLUMNS
    from training import interval
    from training.models import DEFAULT_PARAMS
    from training.train import TARGET, fit

    started = time.perf_counter()
    trips = load_trips([month_uri(month) for month in months])
    loaded = time.perf_counter()
    fit("hgb", DEFAULT_PARAMS["hgb"], trips)
    fitted = time.perf_counter()
    for quantile in interval.QUANTILES:
        interval.quantile_pipeline(quantile).fit(trips[RIDE_COLUMNS], trips[TARGET])
    ranged = time.perf_counter()
    return {
        "months": months,
        "rows": len(trips),
        "load_seconds": round(loaded - started, 2),
        "fit_seconds": round(fitted - loaded, 2),
        "range_fit_seconds": round(ranged - fitted, 2),
        "peak_memory_mib": _peak_memory_mib(),
    }


def _peak_memory_mib() -> int:
    """This process's peak resident memory since its exec (VmHWM; getrusage's maxrss would carry over
    the parent's, which a child inherits across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    raise RuntimeError("no VmHWM in /proc/self/status")


def training_scale() -> dict:
    """Fit time and peak memory on one to five real months together, extrapolated (a straight line in
    rows, fitted to the five) to a yellow-sized month and to a year of them."""
    import subprocess

    import numpy as np

    from data import available_months

    months = available_months()
    runs = []
    for count in range(1, len(months) + 1):
        out = subprocess.run(
            [sys.executable, __file__, "--fit-months", ",".join(months[:count])],
            capture_output=True,
            text=True,
            check=True,
            timeout=1800,
        ).stdout
        runs.append(json.loads(out))
        log.info("training on %s: %s", months[:count], runs[-1])
    rows = np.array([run["rows"] for run in runs], dtype=float)

    def extrapolate(keys: tuple[str, ...], at: float) -> float:
        """A straight line in rows through the sum of ``keys`` of each run, at ``at`` rows."""
        values = np.array([sum(run[key] for key in keys) for run in runs], dtype=float)
        slope, intercept = np.polyfit(rows, values, 1)
        return float(slope * at + intercept)

    projections = {}
    for name, at in (("yellow_month", YELLOW_MONTH_ROWS), ("yellow_year", 12 * YELLOW_MONTH_ROWS)):
        memory_gib = extrapolate(("peak_memory_mib",), at) / 1024
        projections[name] = {
            "rows": at,
            "seconds": round(extrapolate(("load_seconds", "fit_seconds", "range_fit_seconds"), at)),
            "peak_memory_gib": round(memory_gib, 1),
            "fits_one_cloud_run_job": memory_gib <= JOB_MAX_MEMORY_GIB,
        }
    return {"runs": runs, "projections": projections, "job_max_memory_gib": JOB_MAX_MEMORY_GIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rides", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--per-ride", type=Path, help="an earlier run's JSON: model its per_ride and starts without measuring")
    parser.add_argument(
        "--model-only", action="store_true", help="model MEASURED_PER_RIDE (the last full run's figures) without measuring"
    )
    parser.add_argument("--skip-training", action="store_true", help="leave out the training-at-scale runs (minutes)")
    parser.add_argument("--fit-months", help=argparse.SUPPRESS)  # the child of training_scale()
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if args.fit_months:
        print(json.dumps(fit_months(args.fit_months.split(","))))
        return
    from backend.settings import BackendSettings

    if args.model_only:
        # The starts measured with MEASURED_PER_RIDE (docs/capacity.md).
        per_ride, fixes, starts = MEASURED_PER_RIDE, None, Starts(function_seconds=3.3, backend_seconds=3.6)
    elif args.per_ride:
        earlier = json.loads(args.per_ride.read_text())
        per_ride, fixes, starts = PerRide(**earlier["per_ride"]), None, Starts(**earlier["burst"]["starts"])
    else:
        per_ride, fixes, starts = measure(args.rides, args.concurrency)
        log.info("measured: %s", json.dumps({"per_ride": asdict(per_ride), "burst": {"starts": asdict(starts)}}))
    deployment = Deployment()
    backend_settings = BackendSettings.from_env()
    print(
        json.dumps(
            {
                "per_ride": asdict(per_ride),
                # The fixes made (a long poll's connection reused; a ride's updates as one script each),
                # each before and after in this run.
                "fixes": fixes,
                "deployment": asdict(deployment),
                "deployed": deployed(),
                "model": [capacity_model(per_ride, rate, deployment) for rate in RATES],
                "defaults_at_the_claimed_rate": defaults_at_the_claimed_rate(per_ride, deployment),
                "idle": idle_cost(deployment),
                "burst": burst(
                    per_ride, starts, backend_settings.resend_after_seconds, backend_settings.final_bound_seconds, deployment
                ),
                "training": None if args.skip_training else training_scale(),
                "prices": PRICES,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
