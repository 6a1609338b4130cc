"""The local stack's process bookkeeping."""

from __future__ import annotations

import subprocess
import time

from devstack.processes import pid_alive


def test_status_tells_a_running_process_from_a_dead_one():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_alive(child.pid)
        child.kill()
        child.wait()
        assert not pid_alive(child.pid)
        zombie = subprocess.Popen(["true"])
        zombie_pid = zombie.pid
        time.sleep(0.5)  # exited, not yet reaped: a zombie counts as dead
        assert not pid_alive(zombie_pid)
        zombie.wait()
    finally:
        child.kill()


def test_stopping_a_service_whose_leader_died_stops_its_orphans_and_frees_the_port(tmp_path):
    import os
    import signal
    import sys

    from devstack.processes import Service, free_port, port_is_free

    port = free_port()
    # A leader with a child holding the port, as gunicorn's master and its worker.
    argv = ["sh", "-c", f"{sys.executable} -m http.server {port} --bind 127.0.0.1 & wait"]
    service = Service("leader-and-worker", argv, port, tmp_path, f"http://127.0.0.1:{port}/").start(timeout=30)
    os.kill(service.pid, signal.SIGKILL)  # only the leader: its worker lives on
    service.process.wait()
    assert not port_is_free(port)
    service.stop()
    assert port_is_free(port)


def test_two_processes_changing_one_stack_keep_each_others_services(tmp_path):
    """The demo and the local rollout service both write the stack's state: neither drops what the other started."""
    from devstack.stack import Stack

    def started(stack: Stack, key: str, pid: int) -> None:  # what _started() records, without a process
        stack.pids[key] = pid
        stack.changed.add(key)

    demo = Stack(tmp_path)
    started(demo, "backend-0", 101)
    demo.save()
    rollout = Stack.load(tmp_path)  # another process's view
    started(rollout, "function", 202)
    rollout.models["function"] = {"run_id": "r1", "version": "1"}
    rollout.save()
    started(demo, "backend-1", 303)
    demo.save()  # still without the function in memory: it must not erase it
    state = Stack.load(tmp_path)
    assert state.pids == {"backend-0": 101, "function": 202, "backend-1": 303}
    assert state.model == {"run_id": "r1", "version": "1"}
    demo.refresh()
    assert demo.pids["function"] == 202  # and the demo takes it over (to stop it with the rest)
    started(rollout, "function", 404)  # the rollout service replaces the function
    rollout.save()
    demo.save()  # the demo's older view of the function must not bring the old one back
    assert Stack.load(tmp_path).pids["function"] == 404
    rollout.pids.pop("backend-0")
    rollout.removed.add("backend-0")  # what stop() records
    rollout.save()
    assert "backend-0" not in Stack.load(tmp_path).pids
    rollout.pids.pop("function")
    rollout.removed.add("function")
    rollout.models["function"] = {}  # what retire_function() records: the deployment serves nothing now
    rollout.changed.add("function")
    rollout.save()
    demo.save()  # the demo still holds the model it last saw: it must not say the retired deployment serves it
    assert Stack.load(tmp_path).models["function"] == {}


def test_the_rollout_service_is_stopped_before_the_functions_it_would_start_again(tmp_path):
    """`make down` stops the controller first: on its resync it would start a function just stopped."""
    from devstack.stack import Stack

    stack = Stack(tmp_path / "stack")
    for key in ("rollout", "function"):  # the rollout service started before the function it deployed
        process = subprocess.Popen(["sleep", "60"], start_new_session=True)
        stack.pids[key], stack.changed = process.pid, {*stack.changed, key}
    stack.save()
    pids = dict(stack.pids)
    stopped = Stack.load(stack.dir).stop_all()
    assert [line.split()[0] for line in stopped] == ["rollout", "function"]
    assert not any(pid_alive(pid) for pid in pids.values())


# A stack's state file as Stack.save writes it (a demo's, ports and all), its services this test process.
RECORDED_STATE = {
    "pids": {"pubsub": 0, "storage": 0, "mlflow": 0, "prefect": 0},
    "ports": {"pubsub": 8681, "storage": 9023, "mlflow": 5000, "prefect": 4200},
    "urls": {
        "pubsub": "http://127.0.0.1:8681",
        "storage": "http://127.0.0.1:9023",
        "mlflow": "http://127.0.0.1:5000",
        "prefect": "http://127.0.0.1:4200",
    },
    "models": {},
    "specs": {},
    "access": {},
}


def _recorded_stack(folder, pid: int):
    import json

    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({**RECORDED_STATE, "pids": dict.fromkeys(RECORDED_STATE["pids"], pid)}))
    return folder


def test_env_prints_exports_that_point_a_shell_at_the_running_stack(tmp_path, capsys):
    """`eval "$(make env)"`: after it, make train, make promote and mlflow run . reach the stack's MLflow and
    emulators, not the repository's mlflow.db. Only export lines go to stdout: the shell evaluates all of it."""
    import os

    from devstack.__main__ import main

    assert main(["--stack-dir", str(_recorded_stack(tmp_path / "stack", os.getpid())), "env"]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    assert printed.out.splitlines() and all(line.startswith("export ") for line in printed.out.splitlines())
    names = "MLFLOW_TRACKING_URI PUBSUB_EMULATOR_HOST STORAGE_EMULATOR_HOST PREFECT_API_URL GOOGLE_CLOUD_PROJECT"
    echo = " ".join(f"${name}" for name in names.split())
    shell = subprocess.run(["bash", "-c", f'eval "$1"; echo {echo}', "-", printed.out], capture_output=True, text=True)
    assert shell.stdout.split() == [
        "http://127.0.0.1:5000",
        "127.0.0.1:8681",
        "http://127.0.0.1:9023",
        "http://127.0.0.1:4200/api",
        "ridestream-local",
    ], shell.stderr


def test_env_quotes_each_value_as_the_shell_needs():
    from devstack.__main__ import shell_exports

    exports = shell_exports({"PLAIN": "http://127.0.0.1:5000", "ODD": "a b'c $HOME"})
    shell = subprocess.run(
        ["bash", "-c", 'eval "$1"; printf "%s|%s" "$PLAIN" "$ODD"', "-", exports], capture_output=True, text=True
    )
    assert shell.stdout == "http://127.0.0.1:5000|a b'c $HOME"


def test_env_without_a_running_stack_says_so_and_prints_nothing_to_eval(tmp_path, capsys):
    from devstack.__main__ import main

    assert main(["--stack-dir", str(tmp_path / "none"), "env"]) == 1
    printed = capsys.readouterr()
    assert printed.out == "" and "no stack running" in printed.err
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its PID names no process (a stack whose processes died, its state file left behind)
    assert main(["--stack-dir", str(_recorded_stack(tmp_path / "dead", gone.pid)), "env"]) == 1
    printed = capsys.readouterr()
    assert printed.out == "" and "none of its processes runs" in printed.err


def test_the_riders_report_each_outcome_with_its_token_when_the_ride_ends_never_before_its_final():
    """devstack.traffic against the real backend app (in this process, results in memory, the function
    answering at once, or after a second for one ride): each ride's outcome goes back when the ride would
    end, time-compressed, with its token; not before its final, nor before the backend takes it."""
    import json
    import threading

    from test_backend import RecordingPublisher, backend_app, settings
    from werkzeug.serving import make_server

    from backend.results import InMemoryResultStore
    from devstack.traffic import OutcomeReporter, stream
    from ride_contract.ride import Ride

    store = InMemoryResultStore()
    late = "2021-03-04 19:00:00"  # this ride's final comes a second after its POST

    class AnsweringFunction(RecordingPublisher):
        def publish(self, data: bytes, **attributes: str) -> None:
            ride = json.loads(data)
            result = {"ride_id": ride["ride_id"], "duration_final": 10.0, "model_version": "1", "model_run_id": "r"}
            result["ride_fingerprint"] = Ride.model_validate(ride).fingerprint()
            delay = 1.0 if ride["datetime"].replace("T", " ") == late else 0.0
            threading.Timer(delay, store.complete, (ride["ride_id"], result)).start()

    # Outcomes half a second after the POST: the time compression of a test (the rule is 60 s in production).
    app = backend_app(store, AnsweringFunction(), settings(outcome_earliest_seconds=0.5))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = {"PULocationID": 196, "DOLocationID": 28, "trip_distance": 2.5}
    rides = [
        ({**base, "datetime": "2021-03-04 18:00:00"}, 30.0),  # ends 3 s after its POST
        ({**base, "datetime": "2021-03-04 18:10:00"}, 12.0),  # 1.2 s
        ({**base, "datetime": "2021-03-04 18:20:00"}, 1.0),  # 0.1 s: before the backend takes an outcome (425, then again)
        ({**base, "datetime": late}, 1.5),  # 0.15 s, but its final comes after 1 s
    ]
    try:
        reporter = OutcomeReporter(compression=600)
        outcomes = stream(
            [f"http://127.0.0.1:{server.server_port}"], rides, concurrency=4, wait_seconds=2, report_outcomes=reporter
        )
        assert reporter.drain(timeout=60)
        reporter.close()
    finally:
        server.shutdown()
    assert all(o.outcome_reported and o.outcome_error is None for o in outcomes), outcomes
    records = [store.get(o.ride_id) for o in outcomes]
    for outcome, record in zip(outcomes, records, strict=True):
        taken = record["outcome_at"] - record["requested_at"]
        assert record["actual_minutes"] == outcome.actual
        assert taken >= max(0.5, outcome.actual * 60 / 600 - 0.05), (outcome.actual, taken)  # not before the ride ends
        assert record["outcome_at"] >= outcome.answered_at  # nor before its final was seen
