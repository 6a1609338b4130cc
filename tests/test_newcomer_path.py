"""A newcomer's path as the README shows it (issue 35): every `make` target it names exists, and on a stack
started as the demo starts its own (the emulators, MLflow on PostgreSQL, a backend, the rollout controller,
two real versions, the second rolled out while riders come) the three things to try work as written: the
rider page answers, pointing production at version 1 brings the function to it and `status` exits 0, the
README's curl command gets an estimate from version 1, and `eval "$(make env)"` points a shell's registry
commands at the stack; then `down` stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import requests
from conftest import REPO, devstack_cli, started_as_client

from devstack.processes import pid_alive
from devstack.rollouts import RolloutStack, promote_as_the_ui_does, promote_under_traffic

README = (REPO / "README.md").read_text()
FENCED = re.compile(r"```[a-z]*\n(.*?)```", re.S)


def readme_code() -> list[str]:
    """What the README shows as code: its fenced blocks and its inline code spans (which may wrap a line)."""
    blocks = FENCED.findall(README)
    return blocks + re.findall(r"`([^`]+)`", FENCED.sub("", README))


def readme_make_targets() -> set[str]:
    return {target for code in readme_code() for target in re.findall(r"(?<![\w-])make (?:-s )?([a-z][a-z-]*)", code)}


def make_help_targets() -> set[str]:
    listed = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def readme_curl() -> str:
    """The README's curl command, one line, as a shell would run it."""
    [command] = [" ".join(code.split()) for code in readme_code() if code.lstrip().startswith("curl ")]
    return command


def test_every_make_target_the_readme_names_exists():
    named = readme_make_targets()
    assert {"demo", "down", "test", "env", "status", "watch", "help"} <= named, named  # the parser still reads it
    assert named <= make_help_targets(), f"the README names targets make does not have: {named - make_help_targets()}"


class NewcomerStack(RolloutStack):
    """The demo's stack, smaller: v1 serving, then v2 rolled out while riders come and report outcomes."""

    def version_configs(self) -> dict:
        from training.train import TrainConfig

        return {"serving": TrainConfig(trials=1, sample=12_000), "retrained": TrainConfig(trials=1, sample=12_000)}

    def start(self) -> NewcomerStack:
        super().start()
        _, rolled = promote_under_traffic(self.stack, self.versions["retrained"], report_outcomes=True)
        assert rolled["outcome"] == "rolled out", rolled
        return self


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    yield from started_as_client(NewcomerStack(tmp_path_factory.mktemp("newcomer") / "stack", record_access=False))


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_the_three_things_to_try_work_as_the_readme_shows_them(newcomer):
    stack = newcomer.stack
    assert newcomer.versions == {"serving": "1", "retrained": "2"}  # the version numbers the README names
    backend = stack.backend_urls[0]

    # 1. The rider page.
    page = requests.get(f"{backend}/", timeout=10)
    assert page.status_code == 200 and 'id="pickup"' in page.text and 'id="dropoff"' in page.text

    # 2. production -> version 1, as the MLflow UI sets it: the controller brings the function to it, and the
    # status command exits 0 (registry, deployment and riders' answers agree).
    promote_as_the_ui_does(stack, "1")
    stack.wait_rolled_out("production", "1")
    status = devstack_cli(stack.dir, "status")
    assert status.returncode == 0, status.stdout + status.stderr

    # 3. The README's curl, with the backend's port: the coarse estimate, then version 1's answer.
    port = backend.rsplit(":", 1)[1]
    command = readme_curl().replace("PORT", port)
    answer = json.loads(subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, check=True).stdout)
    assert answer["duration_coarse"] > 0, answer
    deadline = time.monotonic() + 60
    while answer.get("status") != "done" and time.monotonic() < deadline:  # wait=2 may come before the final
        answer = requests.get(f"{backend}/rides/{answer['ride_id']}", params={"wait": 5}, timeout=20).json()
    assert answer["status"] == "done" and answer["model_version"] == "1", answer

    # eval "$(make env)" in a shell that knows nothing of the stack: its registry commands then read the stack's.
    shell_env = {k: v for k, v in os.environ.items() if k not in stack.env()}
    exports = devstack_cli(stack.dir, "env")
    assert exports.returncode == 0, exports.stderr
    resolved = subprocess.run(
        ["bash", "-c", f'eval "$(cat)" && {shlex.quote(sys.executable)} -m training.registry resolve'],
        input=exports.stdout,
        cwd=REPO,
        env=shell_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resolved.returncode == 0, resolved.stderr[-2000:]
    assert json.loads(resolved.stdout[resolved.stdout.index("{") :])["version"] == "1", resolved.stdout

    # make down: every process of the stack stopped, by PID (the function the controller started among them).
    stack.refresh()
    pids = dict(stack.pids)
    down = subprocess.Popen(
        [sys.executable, "-m", "devstack", "--stack-dir", str(stack.dir), "down"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Most of the stack are this process's children: reaped here as they stop, or each would linger as a zombie
    # that `down` (another process, as from a shell, where they are nobody's) waits on as still there.
    while down.poll() is None:
        for pid in pids.values():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    assert down.returncode == 0, down.stdout.read()
    assert not stack.state_path.exists() and not {key: pid for key, pid in pids.items() if pid_alive(pid)}
    stack.stop_all()  # this process's own children reaped now, before their PIDs can be anyone else's
