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
