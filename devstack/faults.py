"""Faults on the real local stack, the way an operator meets them, and what riders see meanwhile.

One stack (Pub/Sub and storage emulators, a Redis of its own with AOF, the function, two
backend replicas) serves every scenario. Each scenario streams real rides through the
backends while it breaks something, repairs it, then waits until every accepted ride has
its final duration or an explicit ``failed`` status, and checks each final duration
against the model's own prediction for that ride. ``tests/test_faults.py`` asserts on the
outcomes; ``benchmarks/fault_bench.py`` prints them as a table.

Clients behave like a rider app behind a load balancer: each ride has its own ride_id, a
refused request (503) is retried after its Retry-After, and a replica that does not answer
is skipped for the next one, with the same ride_id.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from devstack.processes import HOST, ServiceError
from devstack.pubsub import publisher_client
from devstack.stack import ARTIFACT_ROOT, BUCKET, PROJECT, TOPICS, Stack
from devstack.traffic import new_riders, real_rides, rider_headers, run_clients
from ride_contract.ride import MAX_DURATION_MINUTES, MIN_DURATION_MINUTES

# Short enough that recovery is quick here, long enough that a healthy ride is never resent.
# Rides are resent every 5 s for up to 150 s (production: every 30 s, 5 times) before they fail.
BACKEND_SETTINGS = {"RESEND_AFTER_SECONDS": "5", "RESEND_MAX_ATTEMPTS": "30", "PUBLISH_TIMEOUT_SECONDS": "3"}
# The stated recovery: every accepted ride is done or failed within this after the repair
# (measured here: 10-27 s). Clients wait longer than that, so a slower recovery is measured, not cut off.
RECOVERY_BOUND_SECONDS = 60
SETTLE_TIMEOUT_SECONDS = 150
# Rides arrive at a steady pace, so the traffic spans the fault (120 rides: 12 s).
RIDES_PER_SECOND = 10


@dataclass
class RideSeen:
    ride_id: str
    ride: dict
    accepted: bool = False
    statuses: list[int] = field(default_factory=list)  # every HTTP status the client got for this ride
    missing_retry_after: int = 0
    final: dict | None = None  # the ride's record once it is no longer pending
    # Its rider (devstack.traffic.rider_headers): a person of its own, whose every request carries its address.
    rider: int = field(default_factory=lambda: new_riders(1))


@dataclass
class FaultOutcome:
    scenario: str
    sent: int
    done: int
    failed: int
    lost: int  # accepted, but neither done nor failed when the bound ran out; or never accepted
    wrong: int  # a final duration that is not the model's prediction for that ride
    out_of_bounds: int  # a final duration outside the ride contract's bounds (1-60 min): must be 0
    server_errors: int  # HTTP 500-599 other than 503: must be 0
    retried_503: int  # refusals the clients retried (each with Retry-After)
    missing_retry_after: int
    recovery_seconds: float  # from the repair to the last ride settled
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "notes"} | {"notes": "; ".join(self.notes)}


class FaultStack:
    """The stack the scenarios share, and the model's expected answer for any ride."""

    def __init__(self, directory: Path, backend_settings: dict[str, str] | None = None, challenger: bool = True):
        self.stack = Stack(directory)
        self.backend_settings = BACKEND_SETTINGS if backend_settings is None else backend_settings
        self.challenger = challenger
        self.model = None
        self.run_id = ""
        self.current: list[RideSeen] = []  # the rides of the scenario running
        self.reuse_statuses: list[int] = []
        self.storage_outage_error = ""
        self.timings: dict[str, float] = {}  # what the scenario measured on the way
        self.request_timeout = 15.0  # how long a client waits for a replica before it tries the next
        self.on_time: bool | None = None  # backend-restart-on-time: finals back on time in the bound
        self.dead_letters: dict[str, int] = {}  # poison-messages: dead letters per source
        self._publisher = None

    def start(self) -> FaultStack:
        from training.settings import Settings
        from training.train import TrainConfig, train

        stack = self.stack
        stack.start_emulators()
        stack.ensure_topology()
        redis_url = stack.start_redis()
        stack.apply_env()
        settings = Settings(f"sqlite:///{stack.dir / 'mlflow.db'}", "faults", ARTIFACT_ROOT, "faults")
        result = train(TrainConfig(trials=1, sample=20_000, register=False), settings)
        self.run_id = result.run_id
        stack.start_function(result.run_id, "1")
        if self.challenger:
            # The shadow challenger answers every ride too (into a topic no backend reads), as on the demo stack.
            stack.start_function(result.run_id, "1", key="challenger")
        stack.start_backends(2, redis_url, self.backend_settings)
        from serving_function.model_store import find_model_uri, load_model

        self.model = load_model(find_model_uri(BUCKET, result.run_id, "mlflow"))
        return self

    def stop(self) -> None:
        self.stack.stop_all()

    def expected(self, rides: list[dict]) -> list[float]:
        """What the function must answer: the model's prediction as served (within the bounds)."""
        validated = [self.model.contract.ride.parse_ride(ride) for ride in rides]
        return [float(m) for m in self.model.contract.result.served_minutes(self.model.model.predict(validated))]

    # --- clients ---------------------------------------------------------------------------------
    def send(self, rides: list[RideSeen], concurrency: int = 8, give_up_after: float = 120) -> None:
        """POST every ride until a replica accepts it (202/200), retrying 503s and dead replicas, and
        replicas that do not answer within ``request_timeout`` (a client behind a load balancer gives up)."""
        urls = self.stack.backend_urls
        started = time.monotonic()

        def post(session: requests.Session, job: tuple[int, RideSeen]) -> None:
            index, seen = job
            time.sleep(max(0.0, started + index / RIDES_PER_SECOND - time.monotonic()))
            deadline = time.monotonic() + give_up_after
            attempt = 0
            while time.monotonic() < deadline:
                url = urls[(index + attempt) % len(urls)]
                attempt += 1
                try:
                    response = session.post(
                        f"{url}/predict",
                        json={**seen.ride, "ride_id": seen.ride_id},
                        headers=rider_headers(seen.rider),
                        timeout=self.request_timeout,
                    )
                except requests.RequestException:
                    time.sleep(0.2)  # that replica is gone: the next one
                    continue
                seen.statuses.append(response.status_code)
                if response.status_code in (200, 202):
                    seen.accepted = True
                    return
                if response.status_code == 503:
                    retry_after = response.headers.get("Retry-After")
                    seen.missing_retry_after += retry_after is None
                    time.sleep(float(retry_after or 1))
                    continue
                return  # anything else is final for this client (and counted)

        run_clients(post, list(enumerate(rides)), concurrency)

    def settle(self, rides: list[RideSeen], timeout: float = SETTLE_TIMEOUT_SECONDS) -> float:
        """Poll until every accepted ride is done or failed; returns when the last one settled."""
        deadline = time.monotonic() + timeout
        waiting = [r for r in rides if r.accepted]
        session = requests.Session()
        while waiting and time.monotonic() < deadline:
            for seen in list(waiting):
                record = self._get(session, seen.ride_id, rider_headers(seen.rider))  # as its rider asks
                if record is not None and record.get("status") != "pending":
                    seen.final = record
                    waiting.remove(seen)
            if waiting:
                # A rider asks about its ride at most twice a second: within LIMIT_POLLS_PER_CLIENT (20 per 10 s).
                time.sleep(0.6)
        return time.monotonic()

    def _get(self, session: requests.Session, ride_id: str, headers: dict[str, str] | None = None) -> dict | None:
        for url in self.stack.backend_urls:
            try:
                response = session.get(f"{url}/rides/{ride_id}", headers=headers, timeout=10)
            except requests.RequestException:
                continue
            if response.status_code == 200:
                return response.json()
        return None

    def outcome(self, name: str, rides: list[RideSeen], repaired_at: float, settled_at: float) -> FaultOutcome:
        expected = dict(zip([r.ride_id for r in rides], self.expected([r.ride for r in rides]), strict=True))
        done = [r for r in rides if r.final and r.final["status"] == "done"]
        failed = [r for r in rides if r.final and r.final["status"] == "failed"]
        wrong = [r for r in done if abs(r.final["duration_final"] - expected[r.ride_id]) > 0.011]
        out_of_bounds = [r for r in done if not MIN_DURATION_MINUTES <= r.final["duration_final"] <= MAX_DURATION_MINUTES]
        statuses = [s for r in rides for s in r.statuses]
        return FaultOutcome(
            scenario=name,
            sent=len(rides),
            done=len(done),
            failed=len(failed),
            lost=len(rides) - len(done) - len(failed),
            wrong=len(wrong),
            out_of_bounds=len(out_of_bounds),
            server_errors=sum(1 for s in statuses if s >= 500 and s != 503),
            retried_503=statuses.count(503),
            missing_retry_after=sum(r.missing_retry_after for r in rides),
            recovery_seconds=round(max(0.0, settled_at - repaired_at), 1),
        )

    def run(self, name: str, count: int, fault: Callable[[FaultStack], float], seed: int = 0) -> FaultOutcome:
        """Stream ``count`` rides while ``fault`` runs (it returns when it repaired what it broke)."""
        rides = [RideSeen(f"{name}-{i}", ride) for i, (ride, _) in enumerate(real_rides(count, seed=seed))]
        self.current = rides
        repaired: list[float] = []
        breaker = threading.Thread(target=lambda: repaired.append(fault(self)), name=f"fault-{name}")
        breaker.start()
        self.send(rides)
        breaker.join()
        settled_at = self.settle(rides)
        return self.outcome(name, rides, repaired[0] if repaired else time.monotonic(), settled_at)

    # --- direct access to the ride stream (a misbehaving sender, duplicate delivery) ------------
    def publisher(self):
        if self._publisher is None:  # one client (and gRPC channel) for every message a scenario sends
            self._publisher = publisher_client(f"{HOST}:{self.stack.ports['pubsub']}")
        return self._publisher

    def publish_ride(self, ride: dict, times: int = 1) -> None:
        topic = self.publisher().topic_path(PROJECT, TOPICS["push"])
        for _ in range(times):
            self.publisher().publish(topic, json.dumps(ride).encode(), ride_id=ride["ride_id"]).result(timeout=30)


# --- the scenarios: each breaks something a little after the rides start, repairs it, returns when --


def backend_replica_down(sig: signal.Signals) -> Callable[[FaultStack], float]:
    """A replica goes down and comes back 5 s later.

    SIGKILL to its whole process group: it dies as a lost instance does, holding what it held.
    SIGTERM: it is stopped as Cloud Run scales in or deploys; it stops pulling and nacks the
    results it holds, so the other replica stores them at once."""

    def fault(fs: FaultStack) -> float:
        time.sleep(1.5)
        os.killpg(fs.stack.pids["backend-0"], sig)
        time.sleep(5)
        fs.stack.restart("backend-0")
        return time.monotonic()

    return fault


def restart_redis(fs: FaultStack) -> float:
    """The shared store is down for 5 s, then back with what it had (AOF)."""
    time.sleep(1.5)
    fs.stack.stop("redis")
    time.sleep(5)
    fs.stack.restart("redis")
    return time.monotonic()


def restart_storage(fs: FaultStack) -> float:
    """The bucket is down; a new function instance cannot start meanwhile (and says why, fast);
    once the bucket is back the function is started again and serves the same model."""
    time.sleep(1.5)
    started = time.monotonic()
    fs.stack.stop("storage")
    fs.timings["storage emulator stopped after (s)"] = round(time.monotonic() - started, 1)
    try:
        fs.stack.restart("function", timeout=60)
        raise AssertionError("the function started without its bucket")
    except ServiceError as exc:  # it carries the function's own last words
        fs.storage_outage_error = str(exc)
    fs.timings["function start without its bucket failed after (s)"] = round(time.monotonic() - started, 1)
    fs.stack.restart("storage")
    fs.stack.restart("function")
    fs.timings["function serving again after (s)"] = round(time.monotonic() - started, 1)
    return time.monotonic()


def kill_and_pause_function(fs: FaultStack) -> float:
    """The function is killed (-9) and started again, then frozen for 10 s (SIGSTOP) and thawed."""
    time.sleep(1.5)
    os.killpg(fs.stack.pids["function"], signal.SIGKILL)
    time.sleep(2)
    fs.stack.restart("function")
    time.sleep(1)
    os.killpg(fs.stack.pids["function"], signal.SIGSTOP)
    time.sleep(10)
    os.killpg(fs.stack.pids["function"], signal.SIGCONT)
    return time.monotonic()


def reuse_ride_ids(fs: FaultStack) -> float:
    """Another ride under ride_ids already answered: through the API (409) and straight onto the
    ride stream, as a buggy sender would. Neither may change what those rides were told."""
    time.sleep(4)  # the first rides of this scenario are accepted, most of them answered
    for seen in fs.current[:6]:
        other = {**seen.ride, "trip_distance": min(seen.ride["trip_distance"] + 20, 150), "ride_id": seen.ride_id}
        response = requests.post(f"{fs.stack.backend_urls[-1]}/predict", json=other, timeout=15)
        fs.reuse_statuses.append(response.status_code)
        fs.publish_ride(other)
    return time.monotonic()


def duplicate_messages(fs: FaultStack) -> float:
    """Each ride of the scenario is delivered to the function three more times."""
    time.sleep(2)
    for seen in fs.current:
        fs.publish_ride({**seen.ride, "ride_id": seen.ride_id}, times=3)
    return time.monotonic()


def _signal_group(fs: FaultStack, key: str, sig: signal.Signals) -> None:
    os.killpg(fs.stack.pids[key], sig)


def publish_hangs_and_clients_retry(fs: FaultStack) -> float:
    """Pub/Sub freezes (SIGSTOP) for 8 s: publishes hang (their timeout here is 3 s). Clients give up on a replica after 1.5 s and
    retry the same ride_id on the other, while the first request's publish is still hanging, then fails."""
    fs.request_timeout = 1.5
    time.sleep(1.5)
    _signal_group(fs, "pubsub", signal.SIGSTOP)
    time.sleep(8)
    _signal_group(fs, "pubsub", signal.SIGCONT)
    return time.monotonic()


def redis_hangs(fs: FaultStack) -> float:
    """The shared store freezes (SIGSTOP) for about 7 s: requests must get their 503 within about a second,
    and /readyz must still answer within its checks."""
    time.sleep(1.5)
    _signal_group(fs, "redis", signal.SIGSTOP)
    time.sleep(2)
    url = fs.stack.backend_urls[0]
    started = time.monotonic()
    try:
        readiness = requests.get(f"{url}/readyz", timeout=10)
        fs.timings["/readyz answered during the hang after (s)"] = round(time.monotonic() - started, 1)
        fs.timings["/readyz status during the hang"] = readiness.status_code
    except requests.RequestException:
        fs.timings["/readyz answered during the hang after (s)"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    response = requests.post(f"{url}/predict", json={**fs.current[0].ride, "ride_id": "hang-probe"}, timeout=10)
    fs.timings["POST answered during the hang after (s)"] = round(time.monotonic() - started, 1)
    fs.timings["POST status during the hang"] = response.status_code
    time.sleep(3)
    _signal_group(fs, "redis", signal.SIGCONT)
    return time.monotonic()


def redis_out_of_memory(fs: FaultStack) -> float:
    """The shared store is full for 5 s (maxmemory below what it holds, noeviction as in infra/): every
    write is refused with OOM, which riders must see as 503s to retry, never as 500s."""
    import redis

    client = redis.Redis.from_url(fs.stack.urls["redis"])
    time.sleep(1.5)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", max(1, int(client.info("memory")["used_memory"]) // 2))
    time.sleep(5)
    client.config_set("maxmemory", 0)
    return time.monotonic()


def _timed_rides(fs: FaultStack, rides: list[dict], prefix: str, rate: float) -> list[tuple[float, float]]:
    """POST each ride with ?wait=10 at ``rate`` per second; (sent at, seconds until its final) for each."""
    started = time.monotonic()
    timed: list[tuple[float, float]] = []
    first_rider = new_riders(len(rides))

    def post(session: requests.Session, job: tuple[int, dict]) -> None:
        index, ride = job
        time.sleep(max(0.0, started + index / rate - time.monotonic()))
        sent = time.monotonic()
        for attempt in range(20):
            url = fs.stack.backend_urls[(index + attempt) % len(fs.stack.backend_urls)]
            try:
                response = session.post(
                    f"{url}/predict?wait=10",
                    json={**ride, "ride_id": f"{prefix}-{index}"},
                    headers=rider_headers(first_rider + index),
                    timeout=15,
                )
            except requests.RequestException:
                time.sleep(0.2)
                continue
            if response.status_code == 503:
                time.sleep(float(response.headers.get("Retry-After", 1)))
                continue
            # Not answered within the wait: as late as the wait, at least.
            timed.append((sent, time.monotonic() - sent if response.status_code == 200 else 10.0))
            return

    run_clients(post, list(enumerate(rides)), concurrency=16)
    return sorted(timed)


def _p95(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("inf")


# After a backend restart, finals must be back on time (p95 under this multiple of the baseline) within this.
ON_TIME_FACTOR = 2.0
ON_TIME_WITHIN_SECONDS = 30


def backends_restart_then_results_on_time(fs: FaultStack) -> float:
    """Both replicas are killed (-9) and started again, one after the other, as `devstack restart` does.
    Riders' finals must be back to their usual latency within ON_TIME_WITHIN_SECONDS: on the emulator's
    streaming pull they stayed 10-60 s late for minutes (the dead clients' streams kept results)."""
    extra = iter([ride for ride, _ in real_rides(40 + 50 * ON_TIME_WITHIN_SECONDS // 5, seed=11)])
    baseline = [latency for _, latency in _timed_rides(fs, [next(extra) for _ in range(40)], "baseline", rate=10)]
    limit = ON_TIME_FACTOR * _p95(baseline)
    for key in ("backend-0", "backend-1"):
        os.killpg(fs.stack.pids[key], signal.SIGKILL)
        fs.stack.restart(key)
    repaired = time.monotonic()
    # 5 s windows of rides (10/s) until one is on time, for at most ON_TIME_WITHIN_SECONDS.
    fs.on_time, late, window = False, 0, 0
    while not fs.on_time and time.monotonic() - repaired < ON_TIME_WITHIN_SECONDS:
        timed = _timed_rides(fs, [next(extra) for _ in range(50)], f"after-restart-{window}", rate=10)
        latencies = [latency for _, latency in timed]
        late += sum(latency > limit for latency in latencies)
        fs.on_time = _p95(latencies) <= limit
        window += 1
    fs.timings["baseline p95 (ms)"] = round(_p95(baseline) * 1000)
    fs.timings["on time after the restart, within (s)"] = round(time.monotonic() - repaired, 1) if fs.on_time else None
    fs.timings["p95 of the last 5 s window (ms)"] = round(_p95(latencies) * 1000)
    fs.timings[f"late after the restart (> {ON_TIME_FACTOR:g}x baseline p95)"] = late
    return repaired


def poison_messages(fs: FaultStack) -> float:
    """Undecodable and invalid rides straight onto the ride stream, seen by production and the shadow
    challenger: each deployment dead-letters each once, saying which it is."""
    from devstack.watch import DeadLetters

    watch = DeadLetters(f"{HOST}:{fs.stack.ports['pubsub']}")
    watch.poll()  # what earlier scenarios left
    before = dict(watch.by_source)
    time.sleep(1)
    poison = [b"{not json", json.dumps({"ride_id": "poison-1", "PULocationID": 999}).encode(), b"[1, 2]"]
    topic = fs.publisher().topic_path(PROJECT, TOPICS["push"])
    for data in poison:
        fs.publisher().publish(topic, data, sender="fault-suite").result(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        watch.poll()
        counted = {source: watch.by_source[source] - before.get(source, 0) for source in watch.by_source}
        if sum(counted.values()) >= 2 * len(poison):
            break
        time.sleep(0.5)
    watch.poll()
    fs.dead_letters = {source: watch.by_source[source] - before.get(source, 0) for source in watch.by_source}
    return time.monotonic()


def failed_cold_starts(fs: FaultStack) -> float:
    """Three instances try to start on a model whose serving form is corrupt: each fails naming the
    model, and none leaves its download in the instances' temporary folder (on Cloud Functions, memory)."""
    from google.cloud import storage

    from devstack.processes import function_server

    time.sleep(1)
    bucket = storage.Client().bucket(BUCKET)
    source = fs.model.uri.removeprefix(f"gs://{BUCKET}/")
    for blob in bucket.list_blobs(prefix=source + "/"):
        target = bucket.blob("broken/" + blob.name[len(source) + 1 :])
        data = b"not a serving form" if blob.name.endswith("serving_form.npz") else blob.download_as_bytes()
        target.upload_from_string(data)
    tmp = fs.stack.dir / "tmp" / "cold-starts"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**fs.stack.env(), "MODEL_URI": f"gs://{BUCKET}/broken", "RUN_ID": "", "TMPDIR": str(tmp)}
    failures = 0
    for attempt in range(3):
        instance = function_server(fs.stack.log_dir, "predict_duration_cloudevent", "cloudevent", env, name=f"cold-{attempt}")
        try:
            instance.start(timeout=60)
            instance.stop()
        except ServiceError as exc:
            failures += "serving form" in str(exc)
    fs.timings["cold starts that failed naming the serving form"] = failures
    fs.timings["folders left in the instances' /tmp"] = len(list(tmp.iterdir()))
    return time.monotonic()


def dead_subscribers_reproduction(fs: FaultStack, mode: str, results: int = 32) -> dict[str, int]:
    """The emulator's defect on plain clients: two result listeners (the backend's own code, in
    ``mode``) are killed (-9), a new one starts, and results are published. Returns how many reached
    the new listener within 2 s, late, or not within 25 s. On streaming pull the emulator keeps
    feeding the dead listeners' streams; unary Pulls do not wait on a dead client."""
    import subprocess
    import sys
    import uuid

    from devstack.pubsub import ensure_subscription, ensure_topic

    emulator = f"{HOST}:{fs.stack.ports['pubsub']}"
    topic = f"probe-{mode}-{uuid.uuid4().hex[:6]}"
    ensure_topic(PROJECT, topic, emulator)
    ensure_subscription(PROJECT, topic, topic + "-sub", emulator_host=emulator)
    logs = fs.stack.dir / "logs"
    env = {**os.environ, **fs.stack.env()}

    def listener(name: str) -> subprocess.Popen:
        with open(logs / f"{topic}-{name}.jsonl", "w") as out:
            argv = [sys.executable, "-m", "devstack.pull_probe", mode, topic + "-sub"]
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL, env=env, start_new_session=True)

    def publish(prefix: str, count: int) -> dict[str, float]:
        sent = {}
        path = fs.publisher().topic_path(PROJECT, topic)
        for index in range(count):
            ride_id = f"{prefix}-{index}"
            result = {"ride_id": ride_id, "duration_final": 10.0, "model_run_id": "probe", "ride_fingerprint": "probe"}
            sent[ride_id] = time.time()
            fs.publisher().publish(path, json.dumps(result).encode()).result(timeout=30)
            time.sleep(0.05)
        return sent

    doomed = [listener("a"), listener("b")]
    survivor = None
    try:
        time.sleep(3)  # both listeners pulling
        publish("warm", 20)
        time.sleep(1.5)
        for process in doomed:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        survivor = listener("c")
        time.sleep(3)
        sent = publish("after", results)
        deadline = time.monotonic() + 25
        stored: dict[str, float] = {}
        while time.monotonic() < deadline and len(stored) < results:
            time.sleep(0.5)
            for line in (logs / f"{topic}-c.jsonl").read_text().splitlines():
                entry = json.loads(line)
                stored.setdefault(entry["ride_id"], entry["at"])
        on_time = sum(1 for ride_id, at in sent.items() if ride_id in stored and stored[ride_id] - at <= 2)
        return {
            "results": results,
            "on_time": on_time,
            "late": len(sent.keys() & stored.keys()) - on_time,
            "missing": len(sent.keys() - stored.keys()),
        }
    finally:
        for process in [*doomed, survivor]:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


SCENARIOS: dict[str, tuple[Callable[[FaultStack], float], int, int]] = {
    # name: (fault, rides, seed)
    "backend-replica-kill": (backend_replica_down(signal.SIGKILL), 120, 1),
    "backend-replica-sigterm": (backend_replica_down(signal.SIGTERM), 120, 6),
    "redis-restart": (restart_redis, 120, 2),
    "storage-restart": (restart_storage, 60, 3),
    "function-kill-and-pause": (kill_and_pause_function, 120, 4),
    "reuse": (reuse_ride_ids, 60, 0),
    "duplicates": (duplicate_messages, 30, 5),
    "publish-hang-retry": (publish_hangs_and_clients_retry, 100, 7),
    "redis-hang": (redis_hangs, 100, 8),
    "redis-oom": (redis_out_of_memory, 100, 9),
    "backend-restart-on-time": (backends_restart_then_results_on_time, 20, 10),
    "poison-messages": (poison_messages, 30, 12),
    "failed-cold-starts": (failed_cold_starts, 30, 13),
}


def run_scenario(fs: FaultStack, name: str, rides: int | None = None) -> FaultOutcome:
    fault, count, seed = SCENARIOS[name]
    fs.reuse_statuses.clear()
    fs.timings.clear()
    fs.request_timeout = 15.0
    outcome = fs.run(name, rides or count, fault, seed=seed)
    if name == "reuse":
        outcome.notes.append(f"another ride under a used ride_id: HTTP {sorted(set(fs.reuse_statuses))}")
    if name == "storage-restart":
        lines = fs.storage_outage_error.splitlines()
        reason = next((line for line in lines if line.startswith("model_store.ModelStoreUnavailable")), "?")
        outcome.notes.append(reason.strip()[:200])
    outcome.notes += [f"{what}: {seconds}" for what, seconds in fs.timings.items()]
    return outcome
