"""The local stack's function deployments as rollout targets (devstack.rollout_service injects them).

The local rollout service and `python -m devstack redeploy` both deploy through this;
a file lock serializes them, as one rollout service does on Google Cloud.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from devstack.processes import pid_alive
from devstack.stack import FUNCTIONS, Stack
from rollout.reconcile import Deployment


class LocalFunctionTarget:
    """``identity``: who deploys, for the access record: the rollout controller's service account, or None for an
    operator's own commands (`make redeploy`), which run as a person, not as a deployable."""

    def __init__(self, stack_dir: str | Path, key: str = "function", identity: str | None = "rollout"):
        if key not in FUNCTIONS:
            raise ValueError(f"no local function {key!r}; there are: {', '.join(FUNCTIONS)}")
        self.stack_dir = Path(stack_dir)
        self.key = key
        self.identity = identity
        self.name = f"local {key} (functions-framework)"

    def _changed_by(self, stack: Stack) -> Stack:
        """On Google Cloud, a new revision or traffic of the function's Cloud Run service (run.developer there)."""
        if self.identity:
            stack.record_use(self.identity, "run", f"service:{self.key}", "deploy")
        return stack

    def serving(self) -> Deployment | None:
        """What the running instance was started with; None if it is not running (it is then started again)."""
        stack = Stack.load(self.stack_dir)
        model, pid = stack.models.get(self.key), stack.pids.get(self.key)
        if not model or pid is None or not pid_alive(pid):
            return None
        return Deployment(model["version"], model["run_id"], deployed_at=model.get("deployed_at"))

    def deploy(self, model: Deployment) -> None:
        with open(self.stack_dir / "rollout.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._changed_by(Stack.load(self.stack_dir)).deploy_function(model.run_id, model.version, key=self.key)

    def retire(self) -> None:
        """No version is wanted here (no challenger alias): stop serving one."""
        with open(self.stack_dir / "rollout.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._changed_by(Stack.load(self.stack_dir)).retire_function(self.key)


# Which function deployment each rolled-out alias drives.
DEPLOYMENT_OF_ALIAS = {"production": "function", "challenger": "challenger"}


def local_rollouts(stack: Stack, aliases: tuple[str, ...] = ("production", "challenger")) -> dict:
    """Rollouts of the stack's function deployments, run (or looked at) in this process rather than the service."""
    from rollout.app import production_guard, registry_resolver
    from rollout.reconcile import Rollout
    from training.settings import Settings

    stack.apply_env()  # this process becomes a client of the stack's registry
    name = Settings.from_env().model_name
    return {
        alias: Rollout(
            alias,
            registry_resolver(name),
            LocalFunctionTarget(stack.dir, DEPLOYMENT_OF_ALIAS[alias], identity=None),
            **(production_guard(name) if alias == "production" else {}),
        )
        for alias in aliases
    }
