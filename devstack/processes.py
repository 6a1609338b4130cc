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
# How long a starting service may take to answer before it counts as failed. Each wait ends as soon as the
# service answers, or its process exits; this only bounds one that hangs. Generous, because a busy machine
# (two test workers, one of them training) can make a server's imports take minutes.
READY_WITHIN_SECONDS = 300
VENV_BIN = Path(sys.executable).parent
# Each service's log is capped: the file and this many predecessors (<name>.log.1, .2) at most this big
# each. An emulator retrying a dead push endpoint once wrote 1.83 GiB in an afternoon (issue 31).
LOG_MAX_BYTES = 20 * 1024 * 1024
LOG_BACKUPS = 2
LOG_WRITER = Path(__file__).resolve().parent / "log_writer.py"


class ServiceError(RuntimeError):
    pass


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` (connections of a stopped server in TIME_WAIT do not count:
    servers bind with SO_REUSEADDR, as this check does)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            return True
        except OSError:
            return False


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when nothing listens there (a stable address people can bookmark), else any free port."""
    if preferred is not None and port_is_free(preferred):
        return preferred
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


def answers_redis(url: str) -> Callable[[], bool]:
    """Ready when the Redis at ``url`` answers PING (and has loaded its data)."""

    def check() -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping())
        except redis.exceptions.RedisError:
            return False

    return check


def ready_check(ready: str | Callable[[], bool]) -> Callable[[], bool]:
    """A readiness check from a URL (http:// answers, redis:// PINGs), or the check itself."""
    if callable(ready):
        return ready
    return answers_redis(ready) if ready.startswith("redis://") else answers_http(ready)


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int
    log_dir: Path
    # A URL (http:// or redis://) when the service must be restartable from its recorded spec.
    ready: str | Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    process: subprocess.Popen | None = None
    log_max_bytes: int = LOG_MAX_BYTES
    log_backups: int = LOG_BACKUPS
    # False for a deployable: it gets only the machine's basics from its starter's environment (machine_env), as
    # a Cloud Run container gets nothing of whoever deployed it; a controller's secret, the development venv's
    # PATH or a test's setting must not reach it unsaid.
    inherit_env: bool = True

    def spec(self) -> dict:
        """What it takes to start this service again (see Stack.restart)."""
        if callable(self.ready):
            raise ServiceError(f"{self.name}: a service restarted from its spec needs a readiness URL")
        return {
            "name": self.name,
            "argv": self.argv,
            "port": self.port,
            "ready": self.ready,
            "env": self.env,
            "cwd": str(self.cwd) if self.cwd else None,
            "inherit_env": self.inherit_env,
        }

    @property
    def url(self) -> str:
        if isinstance(self.ready, str) and self.ready.startswith("redis://"):
            return self.ready
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def log_paths(self) -> list[Path]:
        """The log and the predecessors it was rotated into, oldest first."""
        return [*rotated_logs(self.log_path, self.log_backups), self.log_path]

    def start(self, timeout: float = READY_WITHIN_SECONDS, on_spawn: Callable[[int], None] | None = None) -> Service:
        """Start and wait until ready. ``on_spawn(pid)``: told as soon as the process exists, before it is
        ready, so that whoever started it can stop it even if it dies while waiting (a killed controller)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            capped_log_argv(self.log_path, self.log_max_bytes, self.log_backups, self.argv),
            stdout=subprocess.DEVNULL,  # the service's output goes through the log writer's pipe
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env={**(os.environ if self.inherit_env else machine_env()), **self.env},
            cwd=self.cwd,
            start_new_session=True,  # own process group: stop() reaches its children (and its log writer) too
        )
        if on_spawn is not None:
            on_spawn(self.process.pid)
        check = ready_check(self.ready)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceError(f"{self.name} exited with {self.process.returncode} at start:\n{self.log_tail()}")
            if check():
                return self
            time.sleep(0.2)
        self.stop()
        raise ServiceError(f"{self.name} was not ready on port {self.port} after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines, from the predecessor too when the log was rotated just now."""
        tail = tail_lines(self.log_paths, lines)
        return "\n".join(tail) if tail is not None else "(no log)"

    def stop(self, timeout: float = 5) -> None:
        if self.process is None:
            return
        # The whole group even when its leader is gone: a kill -9'd gunicorn master leaves its
        # workers behind, still holding the port.
        stop_pid(self.process.pid, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)

    def __enter__(self) -> Service:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def capped_log_argv(log: Path, max_bytes: int, backups: int, argv: list[str]) -> list[str]:
    """``argv`` started through the log writer (devstack/log_writer.py): same PID, output in a capped log."""
    limits = ["--max-bytes", str(max_bytes), "--backups", str(backups)]
    return [sys.executable, str(LOG_WRITER), "--log", str(log), *limits, "--", *argv]


def rotated_logs(log: Path, backups: int) -> list[Path]:
    """The predecessors of ``log`` that exist, oldest first (<log>.2, then <log>.1)."""
    candidates = (log.with_name(f"{log.name}.{n}") for n in range(backups, 0, -1))
    return [path for path in candidates if path.exists()]


def tail_lines(paths: list[Path], lines: int, chunk: int = 64 * 1024) -> list[str] | None:
    """The last ``lines`` lines of ``paths`` read as one file (oldest first), reading only their ends; None if none exists."""
    found: list[str] = []
    seen_any = False
    for path in reversed(paths):
        try:
            with open(path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - chunk))
                text = log.read().decode("utf-8", errors="replace")
        except OSError:
            continue
        seen_any = True
        found[:0] = text.splitlines()
        if len(found) >= lines:
            break
    return found[-lines:] if seen_any else None


# What a deployable takes from the machine: the user, locale and temporary folder, and this machine's OpenBLAS
# and OpenMP settings (some processors here need OPENBLAS_CORETYPE for correct results).
MACHINE_VARIABLES = (
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OMP_NUM_THREADS",
)


def machine_env() -> dict[str, str]:
    """The machine's basics from this process's environment, and its PATH without any virtual environment's folder."""
    env = {name: os.environ[name] for name in MACHINE_VARIABLES if name in os.environ}
    folders = os.environ.get("PATH", os.defpath).split(os.pathsep)
    env["PATH"] = os.pathsep.join(f for f in folders if f and not (Path(f).parent / "pyvenv.cfg").exists())
    return env


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
        f"http://{HOST}:{port}/",
    )


def storage_emulator(log_dir: Path, bucket: str, port: int | None = None, data_dir: Path | None = None) -> Service:
    port = port or free_port()
    argv = [str(VENV_BIN / "gcp-storage-emulator"), "start", f"--host={HOST}", f"--port={port}", f"--default-bucket={bucket}"]
    if data_dir is None:
        argv.append("--in-memory")
    else:
        argv[1:1] = ["--data-dir", str(data_dir)]
    return Service("storage-emulator", argv, port, log_dir, f"http://{HOST}:{port}/storage/v1/b")


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
    """A function under functions-framework (by default the serving function), as Cloud Functions would run it:
    from an environment with its requirements.txt only, in its source folder."""
    from devstack.deployables import FUNCTION

    port = port or free_port()
    deployable = source == SERVING_FUNCTION
    # The serving function from its own environment (its requirements.txt only), given nothing of this process's
    # environment; the benchmarks' stand-in functions, which are no deployable, from the development venv.
    program = FUNCTION.bin("functions-framework") if deployable else str(VENV_BIN / "functions-framework")
    argv = [
        program,
        f"--source={source}",
        f"--target={target}",
        f"--signature-type={signature_type}",
        f"--host={HOST}",
        f"--port={port}",
    ]
    env = {**FUNCTION.image_env(), **env} if deployable else env
    return Service(name, argv, port, log_dir, f"http://{HOST}:{port}/", env=env, cwd=source.parent, inherit_env=not deployable)


def redis_server(log_dir: Path, data_dir: Path, port: int | None = None) -> Service:
    """A Redis of the stack's own, with an append-only file in ``data_dir``: a restart keeps every ride
    (the fault tests restart it). Memorystore (infra/) keeps them with a standby replica and hourly
    snapshots instead."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceError("redis-server is not installed (apt-get install redis-server)")
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--bind", HOST, "--port", str(port), "--appendonly", "yes", "--save", "", "--dir", str(data_dir)]
    return Service("redis", argv, port, log_dir, f"redis://{HOST}:{port}/0")
