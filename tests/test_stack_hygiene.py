"""The local stack cleans up after itself, and `devstack status` tells the truth fast (issue 31).

One small real stack (the Pub/Sub and storage emulators, the function and its shadow challenger)
serves the stack's tests; the log cap is tested on a service of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pytest
from conftest import devstack_cli, started_as_client
from google.cloud import pubsub_v1

from devstack.health import DEADLINE_SECONDS
from devstack.processes import Service, free_port, pid_alive
from devstack.pubsub import pull_messages
from devstack.rollout_target import LocalFunctionTarget
from devstack.stack import ARTIFACT_ROOT, FUNCTIONS, PROJECT, SUBSCRIPTIONS, TOPICS, Stack
from devstack.traffic import real_rides
from rollout.reconcile import Deployment

pytestmark = pytest.mark.e2e

EMULATOR_LOG_GROWTH_BOUND = 10 * 1024 * 1024


class SmallStack:
    """The emulators and one small model served by the function and the challenger."""

    def __init__(self, directory):
        self.stack = Stack(directory)
        self.run_id = ""

    def start(self) -> SmallStack:
        from training.settings import Settings
        from training.train import TrainConfig, train

        stack = self.stack
        stack.start_emulators()
        stack.ensure_topology()
        stack.apply_env()
        settings = Settings(f"sqlite:///{stack.dir / 'mlflow.db'}", "hygiene", ARTIFACT_ROOT, "hygiene")
        self.run_id = train(TrainConfig(trials=1, sample=5_000, register=False), settings).run_id
        stack.start_function(self.run_id, "1")
        stack.start_function(self.run_id, "1", key="challenger")
        return self

    def stop(self) -> None:
        self.stack.stop_all()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    yield from started_as_client(SmallStack(tmp_path_factory.mktemp("hygiene") / "stack"))


def push_subscriptions(emulator_host: str) -> dict[str, str]:
    """Every push subscription on the emulator (listed through its API): name -> push endpoint."""
    from devstack.pubsub import subscriber_client

    subscriber = subscriber_client(emulator_host)
    try:
        return {
            sub.name.rsplit("/", 1)[1]: sub.push_config.push_endpoint
            for sub in subscriber.list_subscriptions(project=f"projects/{PROJECT}")
            if sub.push_config.push_endpoint
        }
    finally:
        subscriber.close()


def test_a_retired_shadow_gets_no_subscription_back_and_no_push_is_tried_at_its_port(small):
    stack = Stack.load(small.stack.dir)
    emulator_log = stack.log_dir / "pubsub-emulator.log"
    log_at_start = emulator_log.stat().st_size
    retired_endpoint = stack.urls["challenger"] + "/"
    assert push_subscriptions(f"127.0.0.1:{stack.ports['pubsub']}")[SUBSCRIPTIONS["shadow"]] == retired_endpoint

    LocalFunctionTarget(stack.dir, "challenger").retire()  # what the controller does when no challenger is wanted
    LocalFunctionTarget(stack.dir, "function").deploy(Deployment("1", small.run_id))  # a production deploy
    restarted = devstack_cli(stack.dir, "restart", "pubsub")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr

    stack = Stack.load(stack.dir)
    # Rides flow: production answers every one (the emulator pushed them to it) ...
    publisher = pubsub_v1.PublisherClient()
    rides = [{**ride, "ride_id": f"hygiene-{i}"} for i, (ride, _) in enumerate(real_rides(20, seed=3))]
    for future in [publisher.publish(publisher.topic_path(PROJECT, TOPICS["push"]), json.dumps(r).encode()) for r in rides]:
        future.result(timeout=30)
    answered = pull_messages(PROJECT, SUBSCRIPTIONS["pull"], count=len(rides), timeout=120)
    assert {json.loads(m.data)["ride_id"] for m in answered} == {r["ride_id"] for r in rides}

    # ... and only deployments that serve have a push subscription.
    serving = {stack.urls[key] + "/" for key in FUNCTIONS if key in stack.pids and pid_alive(stack.pids[key])}
    pushes = push_subscriptions(f"127.0.0.1:{stack.ports['pubsub']}")
    assert pushes == {FUNCTIONS["function"]["subscription"]: stack.urls["function"] + "/"}
    assert set(pushes.values()) <= serving
    logged = emulator_log.read_bytes()[log_at_start:] if emulator_log.stat().st_size >= log_at_start else b""
    assert emulator_log.stat().st_size - log_at_start < EMULATOR_LOG_GROWTH_BOUND
    failed = [line for line in logged.decode(errors="replace").splitlines() if "Failed to push" in line]
    # (Only the retired endpoint's: production may miss a push's deadline on a busy machine, and Pub/Sub retries it.)
    assert not [line for line in failed if retired_endpoint.rstrip("/") in line], failed[:3]
    assert "challenger" not in stack.urls and "challenger" not in stack.specs  # its address went with it


def start_controller(stack: Stack) -> int:
    """The stack's rollout service as the demo starts it (its own environment), on the production deployment
    only (no challenger alias: the shadow is left as it is); its PID. Its registry's address answers nothing:
    an MLflow server would cost the suite a minute, and being frozen is all this controller has to do."""
    stack.start_rollout("production=function", settings={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    return stack.pids["rollout"]


def test_status_answers_within_seconds_naming_a_frozen_controller_and_the_rest(small):
    stack = Stack.load(small.stack.dir)
    controller = start_controller(stack)
    os.killpg(controller, signal.SIGSTOP)  # frozen: its port takes connections, nothing answers
    try:
        started = time.monotonic()
        devstack_cli(stack.dir, "--help")  # the command's own start, on this machine as loaded as it is now
        starting = time.monotonic() - started
        started = time.monotonic()
        status = devstack_cli(stack.dir, "status")
        took = time.monotonic() - started
    finally:
        os.killpg(controller, signal.SIGCONT)
        stack.stop("rollout")
    shown = status.stdout + status.stderr
    # Its checks side by side within their deadline, not the frozen controller's 30 s request timeout.
    assert took < starting + DEADLINE_SECONDS + 2, (took, starting, shown)
    assert "Traceback" not in shown, shown
    assert re.search(r'"rollout": "FROZEN', shown), shown
    for other in ("pubsub", "storage", "function"):
        assert re.search(rf'"{other}": "running"', shown), (other, shown)
    assert "the rollout service did not answer" in shown
    assert status.returncode == 1  # something is wrong, and said


def test_a_service_log_is_capped_with_its_predecessors_and_its_tail_still_reads(tmp_path):
    cap, backups, lines = 100_000, 2, 10_000  # 10,000 lines of ~100 bytes: ten times what the files may hold
    port = free_port()
    chatty = (
        f"for i in range({lines}): print(f'line {{i:06d}} ' + 'x' * 88, flush=True)\n"
        f"import http.server\nhttp.server.test(port={port}, bind='127.0.0.1')"
    )
    service = Service("chatty", [sys.executable, "-c", chatty], port, tmp_path, f"http://127.0.0.1:{port}/")
    service.log_max_bytes, service.log_backups = cap, backups
    with service:
        deadline = time.monotonic() + 60
        while f"line {lines - 1:06d}" not in service.log_tail(200) and time.monotonic() < deadline:
            time.sleep(0.2)
        logs = sorted(tmp_path.glob("chatty.log*"))
        assert [p.name for p in logs] == ["chatty.log", "chatty.log.1", "chatty.log.2"]
        assert all(p.stat().st_size <= cap for p in logs), [(p.name, p.stat().st_size) for p in logs]
        assert f"line {lines - 1:06d}" in service.log_tail(200)  # the newest lines are there to read
    assert not pid_alive(service.pid)
