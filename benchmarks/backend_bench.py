"""Real riders against the backend at its deployed threads: POST /predict, then GET /rides/<id>?wait=N until
the final, at the rate the default deployment claims (benchmarks/capacity.py: DEFAULT_MAX_RIDES_PER_SECOND),
on as many instances as the capacity model says that rate needs.

    python benchmarks/backend_bench.py [--seconds 30] [--rate 100] [--instances N] [--backlog-seconds 10] [--before]

The stack is the deployed one in miniature: the Pub/Sub emulator, a Redis of its own as the shared result
store, the function serving a freshly trained model, and the backend's instances started from its image's
environment (backend/Dockerfile: gunicorn gthread and its threads, as on Cloud Run), sharing the store and the
results subscription as Cloud Run's instances do. Riders arrive open-loop, as the page behaves: POST, then long
polls of at most MAX_WAIT_SECONDS until the final; Cloud Run's load balancer is played by sending each rider
to the instance with the fewest requests in flight. The client never has more requests in flight to an
instance than Cloud Run's max_instance_request_concurrency (infra/main.tf) would send it; a request waits
for a slot as it would in Cloud Run's queue. The riders are asyncio tasks on one connection pool (aiohttp),
so the load generator's own CPU stays small beside what it measures, on a machine it shares.

1. steady: the claimed rate for ``--seconds``; the sustained rate is the riders answered per second.
   ``--instances`` defaults to the capacity model's steady-state backend instances at ``--rate`` (by CPU at
   Cloud Run's 60 % target, from its measured per-ride figures): the deployment the rate is claimed for.
2. backlog: the function frozen (SIGSTOP) for ``--backlog-seconds``, so every rider's poll is held its
   whole wait, while riders keep arriving at the rate Cloud Run sends one instance in a backlog (its 60 %
   concurrency target over the wait), on one instance. The POSTs must still be answered at once: a serving
   model with fewer threads than concurrency (the 16 the image had) queues them behind the held polls:
   ``--before`` runs this phase again with that serving model, behind Cloud Run's default concurrency of 80.

One JSON document on stdout, each figure beside its target; logs on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np

from devstack.stack import ARTIFACT_ROOT, Stack
from devstack.traffic import real_rides, rider_headers
from devstack.usage import cpu_seconds

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from capacity import (  # noqa: E402
    DEFAULT_MAX_RIDES_PER_SECOND,
    MEASURED_PER_RIDE,
    Deployment,
    backend_instances,
    deployed,
)

log = logging.getLogger("backend_bench")
FINAL_WITHIN_SECONDS = 60  # a rider gives up after this (the backend's own bound is 150 s)
WARM_UP = 100  # riders before the measured ones, not counted
# The serving model the image had: 1 worker x 16 threads, and Cloud Run's default concurrency (80 per vCPU).
BEFORE_GUNICORN_ARGS, BEFORE_CONCURRENCY = "--worker-class gthread --threads 16 --timeout 60", 80
RETRIED_STATUSES = (429, 502, 503, 504)


class Instance:
    """One Cloud Run instance as a client sees it: at most ``concurrency`` requests in flight; the
    others wait for a slot, counted."""

    def __init__(self, url: str, concurrency: int):
        self.url = url
        self.concurrency = concurrency
        self.in_flight = self.most_in_flight = 0
        self.slot_waits: list[float] = []
        self._slots: asyncio.Semaphore | None = None  # made in the event loop that uses it

    def reset(self) -> None:
        self.in_flight = self.most_in_flight = 0
        self.slot_waits = []
        self._slots = None

    async def request(self, session: aiohttp.ClientSession, method: str, path: str, **kwargs) -> tuple[int, dict, float]:
        """(status, JSON body, Retry-After seconds) once a slot was free."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        started = time.perf_counter()
        async with self._slots:
            self.slot_waits.append(time.perf_counter() - started)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                async with session.request(method, self.url + path, **kwargs) as response:
                    body = await response.json(content_type=None)
                    return response.status, body, float(response.headers.get("Retry-After") or 0)
            finally:
                self.in_flight -= 1


class Balancer:
    """Cloud Run's load balancer as the riders meet it: each request to the instance with the fewest in flight."""

    def __init__(self, instances: list[Instance]):
        self.instances = instances

    def pick(self) -> Instance:
        return min(self.instances, key=lambda instance: instance.in_flight)

    def reset(self) -> None:
        for instance in self.instances:
            instance.reset()

    def figures(self) -> dict:
        return {
            "most_requests_in_flight": [instance.most_in_flight for instance in self.instances],
            "requests_waiting_for_a_slot": sum(1 for i in self.instances for w in i.slot_waits if w > 0.001),
        }


async def call(
    balancer: Balancer, session: aiohttp.ClientSession, seen: dict, deadline: float, method: str, path: str, **kwargs
) -> tuple[int, dict] | None:
    """One request as the rider page makes it (backend/static/rider.js): a 502/503/504 or no answer is
    retried, the same request (ride_id included), after 0.5 s doubling to 8 s and at least the
    Retry-After asked for, until ``deadline``; None when it never got an answer."""
    backoff = 0.5
    while True:
        try:
            status, body, retry_after = await balancer.pick().request(session, method, path, **kwargs)
            if status not in RETRIED_STATUSES:
                return status, body
            seen["retried"].append(f"{status} {body.get('error', '') if isinstance(body, dict) else ''}"[:120])
            delay = max(backoff, retry_after)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            seen["retried"].append(type(exc).__name__[:120])
            delay = backoff
        if time.perf_counter() + delay > deadline:
            return None
        await asyncio.sleep(delay)
        backoff = min(backoff * 2, 8.0)


async def rider(balancer: Balancer, session: aiohttp.ClientSession, ride: dict, wait_seconds: int, index: int) -> dict:
    """POST the ride, then long-poll it until its final: what the rider saw. Rider ``index`` comes from an address
    of its own (devstack.traffic.rider_headers), as riders' phones do: the backends' per-client limits count it."""
    headers = rider_headers(index)
    started = time.perf_counter()
    deadline = started + FINAL_WITHIN_SECONDS
    seen = {"post_status": None, "post_seconds": None, "polls": 0, "final_seconds": None, "retried": []}
    ride = {**ride, "ride_id": uuid.uuid4().hex}  # the page picks the ride_id, so a retried POST books it once
    answer = await call(balancer, session, seen, deadline, "POST", "/predict", json=ride, headers=headers)
    seen["post_seconds"] = time.perf_counter() - started
    seen["post_status"] = None if answer is None else answer[0]
    if answer is None or answer[0] != 202:
        return seen
    while time.perf_counter() < deadline:
        path = f"/rides/{ride['ride_id']}"
        answer = await call(balancer, session, seen, deadline, "GET", path, params={"wait": wait_seconds}, headers=headers)
        seen["polls"] += 1
        if answer is None:
            break
        status, body = answer
        if status == 200 and body.get("status") in ("done", "failed"):
            seen["final_seconds"], seen["status"] = time.perf_counter() - started, body["status"]
            break
    return seen


async def _ride_at_rate(balancer: Balancer, rides: list[dict], rate: float, wait_seconds: int, during=None) -> dict:
    # No pool limit of the client's own: the instances' slots are the limit, as Cloud Run's are.
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        started = time.perf_counter()
        side = asyncio.create_task(asyncio.to_thread(during, started)) if during else None
        tasks = []
        for index, ride in enumerate(rides):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(rider(balancer, session, ride, wait_seconds, index)))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        if side:
            await side
    return summarize(list(results), rate, elapsed)


def ride_at_rate(balancer: Balancer, rides: list[dict], rate: float, wait_seconds: int, during=None) -> dict:
    """Riders arriving ``rate`` a second (open loop), each a task of its own; ``during(started_at)`` runs in a
    thread beside them. The riders' figures, and the rate at which they were answered."""
    balancer.reset()
    result = asyncio.run(_ride_at_rate(balancer, rides, rate, wait_seconds, during))
    return {**result, **balancer.figures()}


def backlog_phase(stack: Stack, balancer: Balancer, rides: list[dict], rate: float, seconds: float, wait_seconds: int) -> dict:
    """Riders at ``rate`` while the function is frozen ``seconds``: every poll meanwhile is held its whole wait."""
    group = os.getpgid(stack.pids["function"])
    if group == os.getpgid(0):
        raise RuntimeError("the function runs in this process's group: freezing it would freeze the benchmark")

    def freeze(started_at: float) -> None:
        os.killpg(group, signal.SIGSTOP)
        try:
            time.sleep(max(0.0, started_at + seconds - time.perf_counter()))
        finally:
            os.killpg(group, signal.SIGCONT)

    log.info("backlog: function frozen %g s, %d riders at %g/s", seconds, len(rides), rate)
    return ride_at_rate(balancer, rides, rate, wait_seconds, during=freeze)


def summarize(results: list[dict], rate: float, elapsed: float) -> dict:
    answered = [r for r in results if r["final_seconds"] is not None and r.get("status") == "done"]
    posts = np.array([r["post_seconds"] for r in results if r["post_seconds"] is not None] or [np.nan])
    finals = np.array([r["final_seconds"] for r in answered] or [np.nan])
    statuses = dict(Counter(str(r["post_status"]) for r in results))
    return {
        "riders": len(results),
        "arrival_rides_per_second": rate,
        "answered": len(answered),
        "lost": len(results) - len(answered),
        "post_statuses": statuses,
        # Answered riders over the time from the first arrival to the last final.
        "sustained_rides_per_second": round(len(answered) / elapsed, 1),
        "post_ms_p50": round(float(np.nanpercentile(posts, 50)) * 1000, 1),
        "post_ms_p99": round(float(np.nanpercentile(posts, 99)) * 1000, 1),
        "final_ms_p50": round(float(np.nanpercentile(finals, 50)) * 1000, 1),
        "final_ms_p95": round(float(np.nanpercentile(finals, 95)) * 1000, 1),
        "polls_per_rider": round(sum(r["polls"] for r in results) / max(len(results), 1), 2),
        "requests_retried": sum(len(r["retried"]) for r in results),
        "why_retried": dict(Counter(reason for r in results for reason in r["retried"]).most_common(5)),
    }


def start_serving(stack: Stack, name: str) -> str:
    """The stack up to the backends: the emulators and their topics, a Redis of its own (its URL is returned),
    and the function serving a freshly trained model (any model: the backend is what is measured)."""
    from training.settings import Settings
    from training.train import TrainConfig, train

    stack.start_emulators()
    stack.ensure_topology()
    redis_url = stack.start_redis()
    stack.apply_env()
    model = train(
        TrainConfig(trials=1, sample=5_000, register=False),
        Settings(f"sqlite:///{stack.dir}/mlflow.db", name, ARTIFACT_ROOT, name, str(REPO / "data")),
    )
    stack.start_function(model.run_id, "1")
    return redis_url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=DEFAULT_MAX_RIDES_PER_SECOND, help="riders arriving per second")
    # 30 s: the clock runs from the first arrival to the last final, so the last riders' finals (about 1 s) are a
    # few percent of the run; over 10 s they alone held the figure 7 % under a rate the backend kept up with.
    parser.add_argument("--seconds", type=float, default=30, help="the steady phase's length")
    parser.add_argument(
        "--instances", type=int, default=0, help="backend instances in the steady phase (default: the capacity model's at --rate)"
    )
    parser.add_argument("--backlog-seconds", type=float, default=10, help="the function frozen this long; 0: no backlog phase")
    parser.add_argument(
        "--before", action="store_true", help="the backlog phase again with the serving model before (16 threads, concurrency 80)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    serving, deployment = deployed(), Deployment()
    wait_seconds = int(deployment.backlog_hold_seconds)
    modelled = backend_instances(MEASURED_PER_RIDE, args.rate, deployment, deployment.steady_hold_seconds)
    instances = args.instances or modelled["instances"]
    # In a backlog Cloud Run keeps each instance at 60 % of its concurrency: the riders whose polls that holds.
    backlog_rate = deployment.backend_concurrency * deployment.concurrency_utilization / wait_seconds
    steady_count = round(args.rate * args.seconds)
    backlog_count = round(backlog_rate * args.backlog_seconds)
    rides = [ride for ride, _ in real_rides(WARM_UP + steady_count + 2 * backlog_count, seed=4)]

    with tempfile.TemporaryDirectory(prefix="backend-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            redis_url = start_serving(stack, "backend-bench")
            stack.start_backends(instances, redis_url)  # from its image's environment: its deployed threads
            names = [f"backend-{index}" for index in range(instances)]
            balancer = Balancer([Instance(url, deployment.backend_concurrency) for url in stack.backend_urls])
            ride_at_rate(balancer, rides[:WARM_UP], 50, wait_seconds)  # warm-up, not counted
            log.info("steady: %d riders at %g/s on %d instances", steady_count, args.rate, instances)
            cpu_before = sum(cpu_seconds(stack.pids[name]) for name in names)
            steady = ride_at_rate(balancer, rides[WARM_UP : WARM_UP + steady_count], args.rate, wait_seconds)
            # CPU is CPU on a busy machine too: what one instance's vCPU serves at Cloud Run's 60 % target.
            cpu_ms = (sum(cpu_seconds(stack.pids[name]) for name in names) - cpu_before) * 1000 / max(steady["answered"], 1)
            steady["instances"] = instances
            steady["backend_cpu_ms_per_ride"] = round(cpu_ms, 2)
            steady["rides_per_second_one_vcpu_at_60_percent"] = round(600 / cpu_ms, 1)
            steady["load_average_1min"] = os.getloadavg()[0]  # the machine's, shared with other work
            backlog = before = None
            if args.backlog_seconds > 0:
                # One instance in a backlog: Cloud Run sends each its 60 % of concurrency, however many there are.
                for name in names[1:]:
                    stack.stop(name)
                one = Balancer(balancer.instances[:1])
                backlog_rides = rides[WARM_UP + steady_count : WARM_UP + steady_count + backlog_count]
                backlog = backlog_phase(stack, one, backlog_rides, backlog_rate, args.backlog_seconds, wait_seconds)
            if args.before and args.backlog_seconds > 0:
                # The serving model before: 16 threads behind Cloud Run's default concurrency of 80.
                stack.stop("backend-0")
                stack.start_backends(1, redis_url, settings={"GUNICORN_CMD_ARGS": BEFORE_GUNICORN_ARGS})
                old = Balancer([Instance(stack.backend_urls[0], BEFORE_CONCURRENCY)])
                ride_at_rate(old, rides[:WARM_UP], 50, wait_seconds)  # warm-up, not counted
                rate = BEFORE_CONCURRENCY * deployment.concurrency_utilization / wait_seconds
                before = backlog_phase(
                    stack, old, rides[-round(rate * args.backlog_seconds) :], rate, args.backlog_seconds, wait_seconds
                )
                before["serving"] = {"gunicorn": BEFORE_GUNICORN_ARGS, "cloud_run_concurrency": BEFORE_CONCURRENCY}
        finally:
            stack.stop_all()

    targets = {
        "sustained_rides_per_second": f">= {args.rate:g} (the claimed rate, riders answered per second)",
        "lost": "0",
        "backlog_post_ms_p99": "<= 1000 (a POST is answered at once while the held polls take their threads)",
    }
    met = steady["sustained_rides_per_second"] >= 0.95 * args.rate and steady["lost"] == 0
    if backlog is not None:
        met = met and backlog["lost"] == 0 and backlog["post_ms_p99"] <= 1000
    print(
        json.dumps(
            {
                "serving": {key: serving[key] for key in ("backend_worker_class", "backend_workers", "backend_threads")}
                | {"cloud_run_concurrency": serving["backend_concurrency"], "wait_seconds": wait_seconds},
                # The instances the capacity model gives the rate (steady state, by CPU and by requests held).
                "modelled_instances_at_the_rate": modelled,
                "steady": steady,
                "backlog": backlog,
                "backlog_with_the_serving_model_before": before,
                "targets": targets,
                # The sustained rate within 5 % of the arrival rate: an open-loop run's last riders'
                # finals end the clock, so a run that keeps up measures just under its arrival rate.
                "met": met,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
