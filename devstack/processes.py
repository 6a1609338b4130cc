"""Start, watch and stop the local stand-ins for cloud services, by PID.

Each service runs in its own process group (its own session), logs to one file
in the stack's log folder, binds to 127.0.0.1 on a free port, and counts as
ready when it answers HTTP. Stopping signals the whole group, so a wrapper
script and the JVM or workers it started go down together.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def answers_http(url: str) -> Callable[[], bool]:
    """Ready as soon as anything answers HTTP at ``url`` (any status counts)."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback only
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    return check


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int
    log_dir: Path
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self, timeout: float = 60) -> Service:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                start_new_session=True,  # own process group: stop() reaches its children too
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceError(f"{self.name} exited with {self.process.returncode} at start:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise ServiceError(f"{self.name} was not ready on port {self.port} after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 5) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        stop_pid(self.process.pid, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)

    def __enter__(self) -> Service:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_pid(pid: int, timeout: float = 5) -> None:
    """Stop the process group led by ``pid``: SIGINT, then SIGTERM, then SIGKILL what is left.

    SIGINT first: gunicorn (functions-framework, the backend) takes SIGTERM as a graceful
    shutdown that waits up to 30 s for connections Pub/Sub keeps open; SIGINT stops it at once."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            # Reap our own child so it does not linger as a zombie that still "exists".
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)


def pubsub_emulator_command() -> list[str]:
    """The official emulator's launcher script: one PID (it execs java)."""
    explicit = os.environ.get("PUBSUB_EMULATOR_BIN")
    if explicit:
        return [explicit]
    gcloud = shutil.which("gcloud")
    if gcloud:
        sdk_root = Path(os.path.realpath(gcloud)).parent.parent
        script = sdk_root / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
        if script.exists():
            return [str(script)]
    raise ServiceError(
        "the Pub/Sub emulator is not installed: install the Google Cloud CLI and run "
        "`gcloud components install pubsub-emulator` (or apt-get install google-cloud-cli-pubsub-emulator), "
        "or set PUBSUB_EMULATOR_BIN to its cloud-pubsub-emulator script"
    )


def pubsub_emulator(log_dir: Path, port: int | None = None) -> Service:
    port = port or free_port()
    return Service(
        "pubsub-emulator",
        [*pubsub_emulator_command(), f"--host={HOST}", f"--port={port}"],
        port,
        log_dir,
        answers_http(f"http://{HOST}:{port}/"),
    )


def storage_emulator(log_dir: Path, bucket: str, port: int | None = None, data_dir: Path | None = None) -> Service:
    port = port or free_port()
    argv = [str(VENV_BIN / "gcp-storage-emulator"), "start", f"--host={HOST}", f"--port={port}", f"--default-bucket={bucket}"]
    if data_dir is None:
        argv.append("--in-memory")
    else:
        argv[1:1] = ["--data-dir", str(data_dir)]
    return Service("storage-emulator", argv, port, log_dir, answers_http(f"http://{HOST}:{port}/storage/v1/b"))


SERVING_FUNCTION = Path(__file__).resolve().parent.parent / "serving_function" / "main.py"


def function_server(
    log_dir: Path,
    target: str,
    signature_type: str,
    env: dict[str, str],
    port: int | None = None,
    name: str = "function",
    source: Path = SERVING_FUNCTION,
) -> Service:
    """A function under functions-framework (by default the serving function), as Cloud Functions would run it."""
    port = port or free_port()
    argv = [
        str(VENV_BIN / "functions-framework"),
        f"--source={source}",
        f"--target={target}",
        f"--signature-type={signature_type}",
        f"--host={HOST}",
        f"--port={port}",
    ]
    return Service(name, argv, port, log_dir, answers_http(f"http://{HOST}:{port}/"), env=env, cwd=source.parent)
