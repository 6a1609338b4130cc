"""POST /predict under concurrent load on loopback: requests/s and latency percentiles.

    python benchmarks/backend_bench.py [--requests 3000] [--concurrency 32]

The backend runs as in its image (gunicorn, the Dockerfile's command) against the Pub/Sub
emulator; each request validates a real ride, computes the coarse estimate, stores it and
waits for its publish to be acknowledged, then answers 202.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from devstack.stack import Stack
from devstack.traffic import real_rides, run_clients

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    rides = [ride for ride, _ in real_rides(args.requests, seed=4)]

    with tempfile.TemporaryDirectory(prefix="backend-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.start_emulators()
            stack.ensure_topology()
            stack.start_backends(1)
            url = stack.backend_urls[0] + "/predict"

            def post(session: requests.Session, ride: dict) -> tuple[int, float]:
                started = time.perf_counter()
                status = session.post(url, json=ride, timeout=30).status_code
                return status, (time.perf_counter() - started) * 1000

            run_clients(post, rides[:200], args.concurrency)  # warm-up, not counted
            started = time.perf_counter()
            results = run_clients(post, rides, args.concurrency)
            elapsed = time.perf_counter() - started
        finally:
            stack.stop_all()

    latencies = np.array([ms for _, ms in results])
    statuses = {str(code): sum(1 for c, _ in results if c == code) for code in sorted({c for c, _ in results})}
    print(
        json.dumps(
            {
                "requests": args.requests,
                "concurrency": args.concurrency,
                "statuses": statuses,
                "requests_per_second": round(len(results) / elapsed, 1),
                "latency_ms_p50": round(float(np.percentile(latencies, 50)), 1),
                "latency_ms_p99": round(float(np.percentile(latencies, 99)), 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
