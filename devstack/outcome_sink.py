"""The local stand-in for the Cloud Storage subscription that files completed rides in a bucket.

On Google Cloud, Pub/Sub itself writes the outcomes topic into the bucket (infra/main.tf,
``outcomes_to_storage``); the emulator has no Cloud Storage subscriptions, so the stack runs this.
It writes what Pub/Sub writes in text format (each message's data, a newline between) as
``outcomes/<UTC time>_<id>.jsonl`` objects, one per ``--max-seconds`` or ``--max-messages``,
and acks only what is in an object. The monitoring flow reads the same prefix either way.

    python -m devstack.outcome_sink --port P --subscription S --bucket B   # /healthz: what it filed
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.api_core import exceptions as gexc

from devstack.processes import HOST

log = logging.getLogger("outcome_sink")
PREFIX = "outcomes/"


class OutcomeSink:
    def __init__(self, project: str, subscription: str, bucket: str, max_seconds: float, max_messages: int, prefix: str = PREFIX):
        from google.cloud import pubsub_v1, storage

        self._subscriber = pubsub_v1.SubscriberClient()
        self._path = self._subscriber.subscription_path(project, subscription)
        self._bucket = storage.Client(project=project).bucket(bucket)
        self._max_seconds, self._max_messages, self._prefix = max_seconds, max_messages, prefix
        self.filed = {"objects": 0, "rides": 0, "last_error": None}

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            ack_ids, lines = [], []
            closes = time.monotonic() + self._max_seconds
            while len(lines) < self._max_messages and (left := closes - time.monotonic()) > 0 and not stop.is_set():
                try:
                    response = self._subscriber.pull(
                        subscription=self._path, max_messages=self._max_messages - len(lines), timeout=min(left, 2)
                    )
                except gexc.DeadlineExceeded:
                    continue
                except Exception as exc:  # the emulator is restarting: what is unacked comes back
                    self.filed["last_error"] = f"{type(exc).__name__}: {exc}"
                    stop.wait(1)
                    continue
                for received in response.received_messages:
                    ack_ids.append(received.ack_id)
                    lines.append(received.message.data.decode())
            if lines:
                self._file(lines, ack_ids)

    def _file(self, lines: list[str], ack_ids: list[str]) -> None:
        name = f"{self._prefix}{dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ}_{uuid.uuid4().hex[:12]}.jsonl"
        try:
            self._bucket.blob(name).upload_from_string("\n".join(lines) + "\n", content_type="text/plain")
            self._subscriber.acknowledge(subscription=self._path, ack_ids=ack_ids)
        except Exception as exc:  # not acked: Pub/Sub hands the rides out again after their ack deadline
            self.filed["last_error"] = f"{type(exc).__name__}: {exc}"
            log.warning("could not file %d completed rides: %s", len(lines), exc)
            return
        self.filed["objects"] += 1
        self.filed["rides"] += len(lines)
        self.filed["last_error"] = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--subscription", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--max-seconds", type=float, default=5.0, help="an object at least this often (Pub/Sub: 1-10 min)")
    parser.add_argument("--max-messages", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sink = OutcomeSink(args.project, args.subscription, args.bucket, args.max_seconds, args.max_messages)

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the stdlib names it so
            body = json.dumps(sink.filed).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # the stack's logs are for the rides, not health checks
            return

    server = ThreadingHTTPServer((HOST, args.port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    try:
        sink.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
