"""Real riders against one backend at its deployed threads: POST /predict, then GET /rides/<id>?wait=N
until the final, at the rate the default deployment claims (benchmarks/capacity.py:
DEFAULT_MAX_RIDES_PER_SECOND).

    python benchmarks/backend_bench.py [--seconds 20] [--rate 100] [--backlog-seconds 10]

The stack is the deployed one in miniature: the Pub/Sub emulator, a Redis of its own as the result store,
the function serving a freshly trained model, and one backend started from its image's environment
(backend/Dockerfile: gunicorn gthread and its threads, as on Cloud Run). Riders arrive open-loop, each in
a thread of its own, as the page does: POST, then long polls of at most MAX_WAIT_SECONDS until the final.
The client never has more requests in flight to the instance than Cloud Run's
max_instance_request_concurrency (infra/main.tf) would send it; a request waits for a slot as it would
in Cloud Run's queue.

1. steady: the claimed rate for ``--seconds``; the sustained rate is the riders answered per second.
2. backlog: the function frozen (SIGSTOP) for ``--backlog-seconds``, so every rider's poll is held its
   whole wait, while riders keep arriving at the rate Cloud Run sends one instance in a backlog (its 60 %
   concurrency target over the wait). The POSTs must still be answered at once: a serving model with
   fewer threads than concurrency (the 16 the image had) queues them behind the held polls.

One JSON document on stdout, each figure beside its target; logs on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from devstack.stack import ARTIFACT_ROOT, Stack
from devstack.traffic import real_rides

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from capacity import DEFAULT_MAX_RIDES_PER_SECOND, Deployment, deployed  # noqa: E402

log = logging.getLogger("backend_bench")
FINAL_WITHIN_SECONDS = 60  # a rider gives up after this (the backend's own bound is 150 s)
WARM_UP = 100  # riders before the measured ones, not counted


class Instance:
    """One Cloud Run instance as a client sees it: at most ``concurrency`` requests in flight; the
    others wait for a slot, counted."""

    def __init__(self, url: str, concurrency: int):
        self.url = url
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.slot_waits: list[float] = []
        self._local = threading.local()

    def request(self, method: str, path: str, **kwargs) -> tuple[requests.Response, float]:
        """The response and its seconds, from asking for a slot to the answer."""
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        started = time.perf_counter()
        with self._slots:
            waited = time.perf_counter() - started
            with self._lock:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                self.slot_waits.append(waited)
            try:
                response = self._local.session.request(method, self.url + path, timeout=30, **kwargs)
            finally:
                with self._lock:
                    self.in_flight -= 1
        return response, time.perf_counter() - started


def rider(instance: Instance, ride: dict, wait_seconds: int) -> dict:
    """POST the ride, then long-poll it until its final: what the rider saw."""
    started = time.perf_counter()
    seen = {"post_status": None, "post_seconds": None, "polls": 0, "final_seconds": None}
    try:
        response, seen["post_seconds"] = instance.request("POST", "/predict", json=ride)
        seen["post_status"] = response.status_code
        if response.status_code != 202:
            return seen
        ride_id = response.json()["ride_id"]
        while time.perf_counter() - started < FINAL_WITHIN_SECONDS:
            response, _ = instance.request("GET", f"/rides/{ride_id}", params={"wait": wait_seconds})
            seen["polls"] += 1
            if response.status_code == 200 and response.json().get("status") in ("done", "failed"):
                seen["final_seconds"] = time.perf_counter() - started
                seen["status"] = response.json()["status"]
                return seen
    except (requests.RequestException, ValueError, KeyError) as exc:
        seen["error"] = f"{type(exc).__name__}: {exc}"
    return seen


def ride_at_rate(instance: Instance, rides: list[dict], rate: float, wait_seconds: int, during=None) -> dict:
    """Riders arriving ``rate`` a second (open loop), each in its own thread; ``during(started_at)`` runs
    beside them. The riders' figures, and the rate at which they were answered."""
    results: list[dict] = []
    with ThreadPoolExecutor(max_workers=min(len(rides), int(rate * FINAL_WITHIN_SECONDS) + 1)) as pool:
        started = time.perf_counter()
        side = threading.Thread(target=during, args=(started,)) if during else None
        if side:
            side.start()
        futures = []
        for index, ride in enumerate(rides):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(rider, instance, ride, wait_seconds))
        results = [future.result() for future in futures]
        elapsed = time.perf_counter() - started
        if side:
            side.join()
    return summarize(results, rate, elapsed)


def summarize(results: list[dict], rate: float, elapsed: float) -> dict:
    answered = [r for r in results if r["final_seconds"] is not None and r.get("status") == "done"]
    posts = np.array([r["post_seconds"] for r in results if r["post_seconds"] is not None] or [np.nan])
    finals = np.array([r["final_seconds"] for r in answered] or [np.nan])
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["post_status"])] = statuses.get(str(r["post_status"]), 0) + 1
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
        "errors": sorted({r["error"] for r in results if "error" in r})[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=DEFAULT_MAX_RIDES_PER_SECOND, help="riders arriving per second")
    parser.add_argument("--seconds", type=float, default=20, help="the steady phase's length")
    parser.add_argument("--backlog-seconds", type=float, default=10, help="the function frozen this long; 0: no backlog phase")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    serving, deployment = deployed(), Deployment()
    wait_seconds = int(deployment.backlog_hold_seconds)
    # In a backlog Cloud Run keeps each instance at 60 % of its concurrency: the riders whose polls that holds.
    backlog_rate = deployment.backend_concurrency * deployment.concurrency_utilization / wait_seconds
    steady_count = round(args.rate * args.seconds)
    backlog_count = round(backlog_rate * args.backlog_seconds)
    rides = [ride for ride, _ in real_rides(WARM_UP + steady_count + backlog_count, seed=4)]

    with tempfile.TemporaryDirectory(prefix="backend-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.start_emulators()
            stack.ensure_topology()
            redis_url = stack.start_redis()
            stack.apply_env()
            from training.settings import Settings
            from training.train import TrainConfig, train

            model = train(
                TrainConfig(trials=1, sample=20_000, register=False),
                Settings(f"sqlite:///{tmp}/mlflow.db", "backend-bench", ARTIFACT_ROOT, "backend-bench", str(REPO / "data")),
            )
            stack.start_function(model.run_id, "1")
            stack.start_backends(1, redis_url)  # from its image's environment: its deployed threads
            instance = Instance(stack.backend_urls[0], deployment.backend_concurrency)
            ride_at_rate(instance, rides[:WARM_UP], 50, wait_seconds)  # warm-up, not counted
            log.info("steady: %d riders at %g/s", steady_count, args.rate)
            instance.most_in_flight, instance.slot_waits = 0, []
            steady = ride_at_rate(instance, rides[WARM_UP : WARM_UP + steady_count], args.rate, wait_seconds)
            steady["most_requests_in_flight"] = instance.most_in_flight
            steady["requests_waiting_for_a_slot"] = sum(1 for w in instance.slot_waits if w > 0.001)
            backlog = None
            if args.backlog_seconds > 0:
                group = os.getpgid(stack.pids["function"])
                if group == os.getpgid(0):
                    raise RuntimeError("the function runs in this process's group: freezing it would freeze the benchmark")

                def freeze(started_at: float) -> None:
                    """The function stops answering for a while: every poll meanwhile is held its whole wait."""
                    os.killpg(group, signal.SIGSTOP)
                    try:
                        time.sleep(max(0.0, started_at + args.backlog_seconds - time.perf_counter()))
                    finally:
                        os.killpg(group, signal.SIGCONT)

                log.info("backlog: function frozen %g s, %d riders at %g/s", args.backlog_seconds, backlog_count, backlog_rate)
                instance.most_in_flight, instance.slot_waits = 0, []
                backlog = ride_at_rate(instance, rides[WARM_UP + steady_count :], backlog_rate, wait_seconds, during=freeze)
                backlog["most_requests_in_flight"] = instance.most_in_flight
                backlog["requests_waiting_for_a_slot"] = sum(1 for w in instance.slot_waits if w > 0.001)
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
                "steady": steady,
                "backlog": backlog,
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
