"""End-to-end stream latency and throughput on the local stack, next to the bare Pub/Sub round trip.

    python benchmarks/stream_bench.py [--rides 2000] [--concurrency 32]

Both loops are closed: CONCURRENCY clients each send one ride and wait for its
answer before sending the next.
  system: POST /predict?wait -> backend publishes -> push -> serving function (model) -> publish -> backend's
          streaming pull -> the waiting request returns the final duration
  bare:   publish -> push -> a relay function that republishes the bytes -> streaming pull
cpu_ms_per_ride: CPU time (user + system, /proc) each process tree spent per ride during the
measured run: the Pub/Sub emulator, the function, the backend (of which the result listener's
callbacks, as the backend counts them), and the load generator (this process).
Targets (issue 13): rides/s >= 0.6x the bare relay's messages/s, p50 <= 1.8x the bare p50, 0 lost.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from devstack.processes import function_server
from devstack.pubsub import ensure_subscription, ensure_topic
from devstack.stack import ARTIFACT_ROOT, PROJECT, Stack
from devstack.traffic import real_rides, stream, summarize
from devstack.usage import cpu_seconds

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def percentiles(values_ms: list[float]) -> dict[str, float]:
    return {f"p{p}": round(float(np.percentile(values_ms, p)), 1) for p in (50, 95, 99)}


class CpuMeter:
    """CPU seconds of named process trees (and of this process) between start() and per_item()."""

    def __init__(self, pids: dict[str, int], listener=None):
        self._pids, self._listener = pids, listener
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {name: cpu_seconds(pid) for name, pid in self._pids.items()}
        now["load_generator"] = time.process_time()
        if self._listener is not None:
            now["backend_result_listener"] = self._listener()
        return now

    def start(self) -> None:
        self._start = self._now()

    def per_item_ms(self, items: int) -> dict[str, float]:
        end = self._now()
        return {name: round((end[name] - self._start[name]) * 1000 / max(items, 1), 3) for name in end}


def listener_cpu(backend_url: str) -> float:
    import requests

    return requests.get(f"{backend_url}/readyz", timeout=10).json()["listener_cpu_seconds"]


def bare_round_trip(stack: Stack, count: int, concurrency: int, workers: int) -> dict:
    from google.cloud import pubsub_v1

    into, out = f"relay-in-{uuid.uuid4().hex[:6]}", f"relay-out-{uuid.uuid4().hex[:6]}"
    for topic in (into, out):
        ensure_topic(PROJECT, topic)
    env = {**stack.env(), "RELAY_TO_TOPIC": out, "WORKERS": str(workers)}
    relay_source = REPO / "benchmarks/relay_function/main.py"
    relay = function_server(stack.log_dir, "relay", "cloudevent", env, name="relay-function", source=relay_source)
    with relay:
        ensure_subscription(PROJECT, into, into + "-push", push_endpoint=relay.url + "/")
        ensure_subscription(PROJECT, out, out + "-pull")
        waiting: dict[str, threading.Event] = {}
        arrived: dict[str, float] = {}

        def on_message(message):
            key = message.attributes["key"]
            arrived[key] = time.perf_counter()
            message.ack()
            waiting[key].set()

        subscriber = pubsub_v1.SubscriberClient()
        future = subscriber.subscribe(subscriber.subscription_path(PROJECT, out + "-pull"), on_message)
        publisher = pubsub_v1.PublisherClient()  # the Publish RPC itself, as the backend calls it
        topic = publisher.topic_path(PROJECT, into)

        def one(i: int) -> float | None:
            key = str(i)
            waiting[key] = threading.Event()
            started = time.perf_counter()
            publisher.api.publish(topic=topic, messages=[{"data": b'{"ride": "bare"}', "attributes": {"key": key}}], timeout=30)
            if waiting[key].wait(30):
                return (arrived[key] - started) * 1000
            return None

        meter = CpuMeter({"pubsub_emulator": stack.pids["pubsub"], "relay_function": relay.pid})
        meter.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(one, range(count)))
        elapsed = time.perf_counter() - started
        cpu = meter.per_item_ms(count)
        future.cancel()
        subscriber.close()
    answered = [x for x in latencies if x is not None]
    return {
        "messages": count,
        "lost": count - len(answered),
        "messages_per_second": round(len(answered) / elapsed, 1),
        "latency_ms": percentiles(answered),
        "cpu_ms_per_message": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rides", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--function-workers", type=int, default=2, help="functions-framework worker processes (WORKERS)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.start_emulators()
            stack.ensure_topology()
            stack.apply_env()
            from training.settings import Settings
            from training.train import TrainConfig, train

            model = train(
                TrainConfig(trials=1, register=False),
                Settings(f"sqlite:///{tmp}/mlflow.db", "bench", ARTIFACT_ROOT, "bench", str(REPO / "data")),
            )
            stack.function_settings["WORKERS"] = str(args.function_workers)
            stack.start_function(model.run_id, "bench")
            stack.start_backends(1)

            bare = bare_round_trip(stack, args.rides, args.concurrency, args.function_workers)
            rides = real_rides(args.rides, seed=2)
            stream(stack.backend_urls, rides[:100], args.concurrency)  # warm-up, not counted
            backend = stack.backend_urls[0]
            meter = CpuMeter(
                {"pubsub_emulator": stack.pids["pubsub"], "function": stack.pids["function"], "backend": stack.pids["backend-0"]},
                listener=lambda: listener_cpu(backend),
            )
            meter.start()
            started = time.perf_counter()
            outcomes = stream(stack.backend_urls, rides, args.concurrency)
            system = summarize(outcomes, time.perf_counter() - started)
            system["cpu_ms_per_ride"] = meter.per_item_ms(len(rides))
        finally:
            stack.stop_all()

    ratio = system.get("latency_ms_p50", float("inf")) / bare["latency_ms"]["p50"]
    throughput_ratio = system.get("rides_per_second", 0) / bare["messages_per_second"]
    print(
        json.dumps(
            {
                "rides": args.rides,
                "concurrency": args.concurrency,
                "function_workers": args.function_workers,
                "bare_round_trip": bare,
                "system": {k: v for k, v in system.items() if k not in ("rmse_coarse", "rmse_final")},
                "targets": {
                    "throughput_ratio_to_bare": {
                        "value": round(throughput_ratio, 2),
                        "target": ">= 0.6",
                        "met": throughput_ratio >= 0.6,
                    },
                    "p50_ratio_to_bare": {"value": round(ratio, 2), "target": "<= 1.8", "met": ratio <= 1.8},
                    "lost": {"value": system["lost"], "target": 0, "met": system["lost"] == 0},
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
