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
   the function and backend instances at the configured CPU (at a few ms of CPU per ride, CPU binds
   long before the function's request concurrency does), Redis operations/s, its thread's load and
   memory held, Pub/Sub volume, log volume, and their price per month and per million rides, from
   ``PRICES``: each price with the public page it was read from and the date. Prices that could not
   be read are None, and the totals say which are missing rather than guess them. The first limit
   each rate meets (``limits``), and the fixed monthly cost of an idle deployment.
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
from functools import partial
from pathlib import Path

log = logging.getLogger("capacity")
REPO = Path(__file__).resolve().parent.parent
RATES = (10, 100, 1_000, 10_000)
SECONDS_PER_MONTH = 30 * 24 * 3600  # the 30-day month of the Pub/Sub pricing page's own example
GIB, TIB = 2**30, 2**40

# USD, as listed on the public pricing pages (Tier 1 regions such as us-central1, europe-west1), read on
# the date given from the stored copy of each page. "free": the monthly free allotment the page states.
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
        "source": "https://cloudchipr.com/blog/cloud-run-pricing (quoting https://cloud.google.com/run/pricing)",
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
    "logging_gib": {
        "usd": 0.50,
        "free": 50,
        "what": "Cloud Logging storage (ingestion), per GiB; first 50 GiB per project per month",
        "source": "https://cloud.google.com/stackdriver/pricing",
        "read": "2026-12-03",
    },
    "memorystore_standard_gb_hour": {
        "usd": None,
        "free": 0,
        "what": "Memorystore for Redis, Standard tier, per GB-hour (no copy of the pricing page could be read)",
        "source": "https://cloud.google.com/memorystore/docs/redis/pricing",
        "read": "2026-12-03",
    },
    "cloud_sql_db_g1_small_hour": {
        "usd": None,
        "free": 0,
        "what": "Cloud SQL for PostgreSQL db-g1-small (MLflow's store), per hour (no copy of the pricing page could be read)",
        "source": "https://cloud.google.com/sql/pricing",
        "read": "2026-12-03",
    },
}
# Pub/Sub bills at least this many bytes per publish, push or pull request (the pricing page).
PUBSUB_MIN_REQUEST_BYTES = 1000
# Memorystore for Redis: the largest primary (the tiers page, https://cloud.google.com/memorystore/docs/redis/redis-tiers).
MEMORYSTORE_MAX_PRIMARY_GB = 300


@dataclass(frozen=True)
class Deployment:
    """What infra/ deploys (tests/test_capacity.py ties these to infra/main.tf)."""

    function_cpu: float = 1.0
    function_memory_gib: float = 1.0
    function_concurrency: int = 16
    function_min_instances: int = 0
    function_max_instances: int = 20
    backend_cpu: float = 1.0
    backend_memory_gib: float = 0.5
    backend_min_instances: int = 1
    backend_max_instances: int = 10
    controller_cpu: float = 1.0
    controller_memory_gib: float = 1.0
    # How busy an instance's CPU may run before another is needed. An assumption of this model, not a
    # platform figure: it leaves room for bursts and for the per-instance threads (pulls, resends).
    cpu_utilization: float = 0.6
    # A challenger in shadow scores every ride too (the push topic's second subscription).
    shadow: bool = True
    # The function's prediction lines also in the _Default log bucket (infra/: prediction_logs_in_default_bucket).
    prediction_logs_in_default_bucket: bool = False
    # Deliveries per topic: one per subscription (infra/main.tf; the test counts them).
    deliveries: dict[str, int] = field(default_factory=lambda: {"push": 2, "pull": 2, "shadow": 2, "outcomes": 2})


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


def capacity_model(per_ride: PerRide, rate: float, deployment: Deployment = Deployment()) -> dict:
    """The deployment at ``rate`` rides/s, sustained for a month: instances, Redis, Pub/Sub, logs, cost."""
    month_rides = rate * SECONDS_PER_MONTH
    scorers = 2 if deployment.shadow else 1
    function_busy = rate * per_ride.function_cpu_ms / 1000 * scorers  # vCPU-seconds per second
    function_instances = math.ceil(function_busy / (deployment.function_cpu * deployment.cpu_utilization))
    backend_busy = rate * (per_ride.backend_request_cpu_ms + per_ride.listener_cpu_ms) / 1000
    backend_instances = max(
        deployment.backend_min_instances, math.ceil(backend_busy / (deployment.backend_cpu * deployment.cpu_utilization))
    )
    redis_ops = rate * per_ride.redis_commands
    redis_busy = rate * per_ride.redis_cpu_ms / 1000  # of Redis's one command thread
    redis_gb = rate * per_ride.record_ttl_seconds * per_ride.redis_memory_bytes / 1e9

    topics = dict(per_ride.topic_bytes)
    if deployment.shadow:
        topics["shadow"] = per_ride.topic_bytes["pull"]  # the shadow's answers: the same message as a final
    pubsub_bytes = {
        topic: rate
        * per_ride.topic_messages.get(topic, 1.0)
        * pubsub_billable_bytes(size, deployment.deliveries[topic], batched_pull=topic != "push")
        for topic, size in topics.items()
    }
    pubsub_tib_month = sum(pubsub_bytes.values()) * SECONDS_PER_MONTH / TIB
    # Each scorer (production, and the challenger in shadow) logs its own lines. What reaches the
    # _Default bucket is billed as ingestion; the prediction lines go to their bucket (the Log Router
    # is free) unless the deployment keeps them in _Default too.
    ingested = {
        name: size * (scorers if name in ("function", "predictions") else 1)
        for name, size in per_ride.log_bytes.items()
        if name != "predictions" or deployment.prediction_logs_in_default_bucket
    }
    logging_gib_month = rate * sum(ingested.values()) * SECONDS_PER_MONTH / GIB
    prediction_log_gib_month = rate * per_ride.log_bytes.get("predictions", 0) * scorers * SECONDS_PER_MONTH / GIB

    # The function bills request time; at a steady stream its instances are busy all the time, so the
    # billed instance-seconds are the instances' seconds.
    function_seconds = function_instances * SECONDS_PER_MONTH
    backend_seconds = backend_instances * SECONDS_PER_MONTH
    costs = {
        "function_cpu": _cost("run_request_vcpu_second", function_seconds * deployment.function_cpu),
        "function_memory": _cost("run_request_gib_second", function_seconds * deployment.function_memory_gib),
        "function_requests": _cost("run_requests_million", month_rides * scorers / 1e6),
        "backend_cpu": _cost("run_instance_vcpu_second", backend_seconds * deployment.backend_cpu),
        "backend_memory": _cost("run_instance_gib_second", backend_seconds * deployment.backend_memory_gib),
        "pubsub": _cost("pubsub_tib", pubsub_tib_month),
        "logging": _cost("logging_gib", logging_gib_month),
        "memorystore": _cost("memorystore_standard_gb_hour", math.ceil(max(redis_gb, 1)) * SECONDS_PER_MONTH / 3600),
    }
    summary = _priced(costs)
    found = limits(function_instances, backend_instances, redis_ops, redis_busy, redis_gb, per_ride, deployment)
    return {
        "rides_per_second": rate,
        "rides_per_month": round(month_rides),
        "function_instances": function_instances,
        "backend_instances": backend_instances,
        "redis_ops_per_second": round(redis_ops),
        "redis_thread_busy": round(redis_busy, 2),
        "redis_memory_gb": round(redis_gb, 2),
        "pubsub_tib_per_month": round(pubsub_tib_month, 3),
        "logging_gib_per_month": round(logging_gib_month, 1),
        "prediction_log_gib_per_month": round(prediction_log_gib_month, 1),
        **summary,
        "priced_usd_per_million_rides": round(summary["priced_total_usd_per_month"] / (month_rides / 1e6), 2),
        "limits": found,
        "first_bottleneck": found[0]["limit"],
    }


def limits(
    function_instances: int,
    backend_instances: int,
    redis_ops: float,
    redis_busy: float,
    redis_gb: float,
    per_ride: PerRide,
    deployment: Deployment,
) -> list[dict]:
    """Each limit modelled, as the share of it this rate uses, the nearest to breaking first; a share
    above 1 is broken, and says what to do."""
    shares = [
        (
            function_instances / deployment.function_max_instances,
            f"function instances: {function_instances} of max_instance_count {deployment.function_max_instances}",
            "raise max_instance_count (and the project's Cloud Run quota), or score rides in batches",
        ),
        (
            backend_instances / deployment.backend_max_instances,
            f"backend instances: {backend_instances} of max_instance_count {deployment.backend_max_instances}",
            "raise max_instance_count; fewer Redis round trips per ride cut the request path's CPU",
        ),
        (
            redis_busy / deployment.cpu_utilization,
            f"redis: {redis_ops:,.0f} commands/s keep its one command thread {redis_busy:.0%} busy "
            f"(of {deployment.cpu_utilization:.0%})",
            "Memorystore for Redis Cluster, sharded by ride_id; or fewer round trips per ride",
        ),
        (
            redis_gb / MEMORYSTORE_MAX_PRIMARY_GB,
            f"redis memory: {redis_gb:,.0f} GB held ({per_ride.record_ttl_seconds / 3600:g} h TTL) of the "
            f"{MEMORYSTORE_MAX_PRIMARY_GB} GB largest primary",
            "shorten RESULT_TTL_SECONDS (a ride needs its record for the ride, not a day), or shard",
        ),
    ]
    return [
        {"limit": what, "share": round(share, 2), **({"fix": fix} if share > 1 else {})}
        for share, what, fix in sorted(shares, reverse=True)
    ]


def idle_cost(deployment: Deployment = Deployment()) -> dict:
    """A month with no rides: what stays on (the backend's minimum instance, the rollout controller, the
    smallest Memorystore instance, MLflow's Cloud SQL). The function and MLflow's server scale to zero."""
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
        "memorystore_1_gb": _cost("memorystore_standard_gb_hour", seconds / 3600),
        "cloud_sql": _cost("cloud_sql_db_g1_small_hour", seconds / 3600),
    }
    return _priced(costs)


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
    per_ride: PerRide, starts: Starts, resend_after: float, final_bound: float, deployment: Deployment = Deployment()
) -> dict:
    """The step from BURST_FROM to BURST_TO rides/s, on the production function (riders wait for its
    final; the shadow's service scales the same way, and nobody waits for it) and on the backend
    (riders wait for its coarse estimate), each under both bounds of the autoscaler."""
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
    from devstack.traffic import real_rides, stream, summarize
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
            outcomes = stream(stack.backend_urls, traffic[100:], concurrency, report_outcomes=True)
            summary = summarize(outcomes, time.perf_counter() - started)
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
    parser.add_argument("--skip-training", action="store_true", help="leave out the training-at-scale runs (minutes)")
    parser.add_argument("--fit-months", help=argparse.SUPPRESS)  # the child of training_scale()
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if args.fit_months:
        print(json.dumps(fit_months(args.fit_months.split(","))))
        return
    from backend.settings import BackendSettings

    if args.per_ride:
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
                "model": [capacity_model(per_ride, rate, deployment) for rate in RATES],
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
