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
