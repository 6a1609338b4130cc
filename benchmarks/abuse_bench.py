"""One abusive client at 50 times its limit beside 20 ordinary riders, on the same stack, with the default limits.

    python benchmarks/abuse_bench.py [--seconds 30] [--riders 20] [--times-the-limit 50]

The stack is backend_bench.py's (the Pub/Sub emulator, a Redis of its own as the shared store and the limits'
counter, the function serving a freshly trained model, two backend instances from the image's environment).
Each ordinary rider books a ride as the page does (POST, then long polls until the final), thinks two seconds,
and books the next, from an address of its own. The run has two phases of ``--seconds`` each: the riders
alone (their usual time), then the riders while one client POSTs new rides from one address at
``--times-the-limit`` times LIMIT_RIDES_PER_CLIENT, never slowing down for a 429.

Prints one JSON document on stdout, each figure beside its target:
- the abuser: rides it got booked (at most its limit's count for the phase) and the share refused;
- the riders: every final came (0 lost), and the p95 from POST to final stays within their usual time
  (at most 1.5 times the phase without the abuser, or 0.5 s more, whichever is larger);
- Redis: its memory during the abuse, and the limits' keys and window entries (bounded by the limits, not by
  what the abuser sends).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np
import redis
from limits import parse

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from backend_bench import Balancer, Instance, rider, start_serving  # noqa: E402
from capacity import MEASURED_PER_RIDE, Deployment  # noqa: E402

from backend.settings import BackendSettings  # noqa: E402
from devstack.stack import Stack  # noqa: E402
from devstack.traffic import real_rides  # noqa: E402

log = logging.getLogger("abuse_bench")
THINK_SECONDS = 2.0  # between a rider's final and its next ride
ABUSER = "198.51.100.66"  # one address, as a script on one machine has
INSTANCES = 2
WARM_UP_SECONDS = 10  # riders before the measured ones (first connections, first model loads), not counted


async def ordinary_rider(balancer: Balancer, session: aiohttp.ClientSession, rides: list[dict], index: int, until: float) -> list:
    """Ride after ride until ``until``: what each one saw (backend_bench.rider)."""
    seen, ride = [], 0
    while time.perf_counter() < until:
        seen.append(await rider(balancer, session, rides[ride % len(rides)], wait_seconds=10, index=index))
        ride += 1
        await asyncio.sleep(THINK_SECONDS)
    return seen


async def abusive_client(
    balancer: Balancer, session: aiohttp.ClientSession, ride: dict, per_second: float, until: float
) -> Counter:
    """New rides POSTed at ``per_second`` from one address, whatever the answers: the statuses it got."""
    statuses: Counter = Counter()
    started, sent = time.perf_counter(), 0

    async def one() -> None:
        try:
            status, _, _ = await balancer.pick().request(
                session, "POST", "/predict", json={**ride, "ride_id": uuid.uuid4().hex}, headers={"X-Forwarded-For": ABUSER}
            )
            statuses[str(status)] += 1
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            statuses[type(exc).__name__] += 1

    tasks = []
    while time.perf_counter() < until:
        tasks.append(asyncio.create_task(one()))
        sent += 1
        await asyncio.sleep(max(0.0, started + sent / per_second - time.perf_counter()))
    await asyncio.gather(*tasks)
    return statuses


async def _phase(balancer: Balancer, rides: list[dict], riders: int, seconds: float, abuse_per_second: float) -> dict:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        until = time.perf_counter() + seconds
        work = [ordinary_rider(balancer, session, rides[i::riders], i, until) for i in range(riders)]
        if abuse_per_second:
            work.append(abusive_client(balancer, session, rides[0], abuse_per_second, until))
        done = await asyncio.gather(*work)
    seen = [ride for rider_seen in done[:riders] for ride in rider_seen]
    finals = [s["final_seconds"] for s in seen if s["final_seconds"] is not None and s.get("status") == "done"]
    figures = {
        "rides": len(seen),
        "answered": len(finals),
        "lost": len(seen) - len(finals),
        "final_ms_p50": round(float(np.percentile(finals, 50)) * 1000, 1) if finals else None,
        "final_ms_p95": round(float(np.percentile(finals, 95)) * 1000, 1) if finals else None,
        "requests_retried": sum(len(s["retried"]) for s in seen),
    }
    if abuse_per_second:
        figures["abuser_statuses"] = dict(done[riders])
    return figures


def limits_in_redis(client: redis.Redis) -> dict:
    keys = list(client.scan_iter("*:limits/*"))
    windows = [client.llen(key) for key in keys if client.type(key) == b"list"]
    return {"keys": len(keys), "largest_window_entries": max(windows, default=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30, help="each phase's length")
    parser.add_argument("--riders", type=int, default=20, help="ordinary riders")
    parser.add_argument("--times-the-limit", type=float, default=50, help="the abuser's rate, in times its per-client limit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("LIMIT_RIDES_PER_CLIENT", "LIMIT_RIDES_OVERALL", "LIMIT_POLLS_PER_CLIENT"):
        os.environ.pop(name, None)  # the defaults are what is measured
    defaults = BackendSettings.from_env()
    limit = parse(defaults.rides_per_client)
    limit_per_second = limit.amount / limit.get_expiry()
    abuse_per_second = args.times_the_limit * limit_per_second
    # What one address may book in the abuse phase: the limit's count in each window the phase spans.
    most_booked = limit.amount * max(1, int(np.ceil(args.seconds / limit.get_expiry())))
    rides = [ride for ride, _ in real_rides(2000, seed=9)]
    deployment = Deployment()

    with tempfile.TemporaryDirectory(prefix="abuse-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            redis_url = start_serving(stack, "abuse-bench")
            stack.start_backends(INSTANCES, redis_url)  # the image's environment, the default limits
            balancer = Balancer([Instance(url, deployment.backend_concurrency) for url in stack.backend_urls])
            store = redis.Redis.from_url(redis_url)
            asyncio.run(_phase(balancer, rides[1500:], args.riders, WARM_UP_SECONDS, 0))  # warm, not counted
            balancer.reset()
            log.info("riders alone: %d for %g s", args.riders, args.seconds)
            alone = asyncio.run(_phase(balancer, rides, args.riders, args.seconds, 0))
            memory_before = store.info("memory")["used_memory"]
            log.info("riders and one client at %g POSTs/s (%gx its limit)", abuse_per_second, args.times_the_limit)
            balancer.reset()
            abused = asyncio.run(_phase(balancer, rides[1000:], args.riders, args.seconds, abuse_per_second))
            memory_after = store.info("memory")["used_memory"]
            in_redis = limits_in_redis(store)
        finally:
            for line in stack.stop_all():
                log.info("stopped %s", line)

    statuses = abused.pop("abuser_statuses")
    sent = sum(statuses.values())
    usual = alone["final_ms_p95"] or 0.0
    within = max(1.5 * usual, usual + 500)
    # The riders' own records in the phase (and the abuser's few): what the store is for; the limits add little.
    records_bound = (abused["rides"] + most_booked) * MEASURED_PER_RIDE.redis_memory_bytes + 2_000_000
    document = {
        "limits": {"rides_per_client": defaults.rides_per_client, "polls_per_client": defaults.polls_per_client},
        "abuser": {
            "posts_per_second": round(abuse_per_second, 2),
            "sent": sent,
            "statuses": statuses,
            "booked": {"value": statuses.get("202", 0) + statuses.get("200", 0), "target": f"<= {most_booked}"},
            "refused_share": {
                "value": round(statuses.get("429", 0) / max(sent, 1), 4),
                "target": f">= {1 - most_booked / max(sent, 1):.4f}",
            },
        },
        "riders_alone": alone,
        "riders_beside_the_abuser": {
            **abused,
            "lost": {"value": abused["lost"], "target": 0},
            "final_ms_p95": {"value": abused["final_ms_p95"], "target": f"<= {within:.0f} (their usual time: {usual:.0f})"},
        },
        "redis": {
            "memory_growth_bytes_during_the_abuse": {"value": memory_after - memory_before, "target": f"<= {records_bound}"},
            "limit_keys": in_redis["keys"],
            "largest_limit_window_entries": {
                "value": in_redis["largest_window_entries"],
                "target": f"<= {parse(defaults.rides_overall).amount}",
            },
        },
    }
    booked = document["abuser"]["booked"]["value"]
    document["met"] = (
        booked <= most_booked
        and abused["lost"] == 0
        and abused["final_ms_p95"] is not None
        and abused["final_ms_p95"] <= within
        and memory_after - memory_before <= records_bound
    )
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
