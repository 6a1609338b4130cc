"""The serving function on Cloud Functions (2nd gen) as a rollout target, through the gcloud CLI.

Deploying only changes the model's environment variables (operations.deploy). Cloud
Functions builds a new revision and moves traffic to it only once it starts: a revision
that cannot load its model never serves, and the previous one keeps the traffic.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime

from operations.deploy import describe_command, model_redeploy_command
from rollout.reconcile import Deployment

GCLOUD_TIMEOUT_SECONDS = 900  # a deploy builds and starts a revision: minutes, not hours


class CloudFunctionTarget:
    def __init__(self, function_name: str):
        self.function_name = function_name
        self.name = f"Cloud Function {function_name}"

    def _gcloud(self, command: list[str]) -> str:
        done = subprocess.run(command, capture_output=True, text=True, timeout=GCLOUD_TIMEOUT_SECONDS, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:4])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done.stdout

    def serving(self) -> Deployment | None:
        description = json.loads(self._gcloud(describe_command(self.function_name)) or "{}")
        env = (description.get("serviceConfig") or {}).get("environmentVariables") or {}
        if not env.get("RUN_ID"):
            return None
        updated = description.get("updateTime")
        deployed_at = datetime.fromisoformat(updated.replace("Z", "+00:00")).timestamp() if updated else None
        return Deployment(env.get("MODEL_VERSION", ""), env["RUN_ID"], env.get("MODEL_URI", ""), deployed_at)

    def deploy(self, model: Deployment) -> None:
        self._gcloud(model_redeploy_command(model, self.function_name))
