"""The access recorder: for each identity, a Pub/Sub proxy and a storage proxy of its own in front of the
emulators, so every Google Cloud call of a deployable is attributed to the identity it runs as; each new use is
appended to the record file at once. One process for the whole stack, with a control port answering
``/healthz`` (ready once every proxy listens) and ``/record`` (the uses so far, as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from devstack.access.pubsub_proxy import PubSubProxy
from devstack.access.record import Use, append_new_uses, read_record
from devstack.access.storage_proxy import StorageProxy
from devstack.processes import HOST, Service, free_port


@dataclass(frozen=True)
class IdentityPorts:
    pubsub: int
    storage: int


def identity_env(ports: IdentityPorts) -> dict[str, str]:
    """What a deployable running as this identity needs to reach the emulators through its own proxies."""
    return {"PUBSUB_EMULATOR_HOST": f"{HOST}:{ports.pubsub}", "STORAGE_EMULATOR_HOST": f"http://{HOST}:{ports.storage}"}


def read_ports(ports_file: str | Path) -> dict[str, IdentityPorts]:
    """The ports a running recorder listens on, per identity (what it wrote to its ports file)."""
    written = json.loads(Path(ports_file).read_text())
    return {identity: IdentityPorts(**ports) for identity, ports in written["identities"].items()}


class AccessRecorder:
    """The proxies of every identity, recording into ``record_file``. ``identities``: name -> ports (0: free ones)."""

    def __init__(
        self, pubsub_upstream: str, storage_upstream: str, record_file: str | Path, identities: dict[str, IdentityPorts]
    ) -> None:
        self.record_file = Path(record_file)
        self._lock = threading.Lock()
        self._seen = read_record(self.record_file)  # a restarted recorder does not write a line twice
        self.pubsub: dict[str, PubSubProxy] = {}
        self.storage: dict[str, StorageProxy] = {}
        for identity, ports in identities.items():
            record = self._recorder(identity)
            self.pubsub[identity] = PubSubProxy(pubsub_upstream, record("pubsub"), ports.pubsub)
            self.storage[identity] = StorageProxy(storage_upstream, record("storage"), ports.storage)

    def _recorder(self, identity: str):
        def for_service(service: str):
            def record(pairs: list[tuple[str, str]]) -> None:
                self.record(Use(identity, service, resource, action) for resource, action in pairs)

            return record

        return for_service

    def record(self, uses) -> None:
        with self._lock:
            new = set(uses) - self._seen
            if new:
                append_new_uses(self.record_file, new)
                self._seen |= new

    def ports(self) -> dict[str, IdentityPorts]:
        return {identity: IdentityPorts(self.pubsub[identity].port, self.storage[identity].port) for identity in self.pubsub}

    def env(self, identity: str) -> dict[str, str]:
        return identity_env(self.ports()[identity])

    def uses(self) -> set[Use]:
        return read_record(self.record_file)

    def start(self) -> AccessRecorder:
        for proxy in (*self.pubsub.values(), *self.storage.values()):
            proxy.start()
        return self

    def stop(self) -> None:
        for proxy in (*self.pubsub.values(), *self.storage.values()):
            proxy.stop()

    def __enter__(self) -> AccessRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _control_server(recorder: AccessRecorder, port: int) -> ThreadingHTTPServer:
    class Control(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/healthz":
                body = {"ok": True, "identities": {name: asdict(ports) for name, ports in recorder.ports().items()}}
            elif self.path == "/record":
                body = [asdict(use) for use in sorted(recorder.uses())]
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return ThreadingHTTPServer((HOST, port), Control)


def _identity(text: str) -> tuple[str, IdentityPorts]:
    """``NAME`` (free ports) or ``NAME=PUBSUB_PORT,STORAGE_PORT``."""
    name, _, ports = text.partition("=")
    pubsub, storage = (int(port) for port in ports.split(",")) if ports else (0, 0)
    return name, IdentityPorts(pubsub, storage)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack.access", description=__doc__)
    parser.add_argument("--pubsub-upstream", required=True, help="the Pub/Sub emulator, host:port")
    parser.add_argument("--storage-upstream", required=True, help="gcp-storage-emulator, http://host:port")
    parser.add_argument("--record", required=True, type=Path, help="the JSONL record, appended to")
    parser.add_argument(
        "--identity", action="append", required=True, type=_identity, help="NAME or NAME=PUBSUB_PORT,STORAGE_PORT"
    )
    parser.add_argument("--control-port", type=int, required=True, help="/healthz and /record")
    parser.add_argument("--ports-file", type=Path, help="where to write the ports of each identity (JSON)")
    args = parser.parse_args(argv)
    recorder = AccessRecorder(args.pubsub_upstream, args.storage_upstream, args.record, dict(args.identity)).start()
    if args.ports_file:
        ports = {"identities": {name: asdict(ports) for name, ports in recorder.ports().items()}}
        _write_atomically(args.ports_file, json.dumps(ports, indent=2, sort_keys=True))
    # Listening last: readiness (anything answering on the control port) means every proxy is up.
    control = _control_server(recorder, args.control_port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        control.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        control.server_close()
        recorder.stop()


def _distinct_free_ports(count: int) -> list[int]:
    """``count`` free ports, none twice (free_port may hand out a port it handed out a moment ago)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def recorder_service(
    log_dir: Path,
    record_file: Path,
    identities: list[str],
    pubsub_upstream: str,
    storage_upstream: str,
    ports_file: Path | None = None,
) -> tuple[Service, dict[str, IdentityPorts]]:
    """The recorder as a devstack Service, restartable from its spec (its ports are fixed in its argv), and the
    ports of each identity (for identity_env; also written to ``ports_file`` for other processes: read_ports)."""
    control, *free = _distinct_free_ports(1 + 2 * len(identities))
    ports = {identity: IdentityPorts(free[2 * i], free[2 * i + 1]) for i, identity in enumerate(identities)}
    argv = [
        sys.executable, "-m", "devstack.access", "--pubsub-upstream", pubsub_upstream,
        "--storage-upstream", storage_upstream, "--record", str(record_file), "--control-port", str(control),
        *(f"--identity={name}={p.pubsub},{p.storage}" for name, p in ports.items()),
        *(["--ports-file", str(ports_file)] if ports_file else []),
    ]  # fmt: skip
    return Service("access-recorder", argv, control, log_dir, f"http://{HOST}:{control}/healthz"), ports
