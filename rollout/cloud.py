"""The serving function on Google Cloud as rollout targets: revisions and traffic of its Cloud Run service.

A 2nd-gen function runs on a Cloud Run service of the same name, and each deploy makes a revision
of it (https://cloud.google.com/functions/docs/configuring/traffic-splitting). A model rollout
changes only which model serves, never the function's code, so it does not go through
`gcloud functions deploy` (a source upload and a Cloud Build per promotion, and code that
drifts from what Terraform deployed). It makes a revision of the running image with the
model's identity in its environment, and moves traffic:

  gcloud run services update SERVICE --no-traffic --revision-suffix=... --update-env-vars=RUN_ID=...
      a revision of the same image and settings, with no traffic yet (no upload, no build)
      https://cloud.google.com/sdk/gcloud/reference/run/services/update
  gcloud run services update-traffic SERVICE --to-revisions=REVISION=100      production
  gcloud run services update-traffic SERVICE --update-tags=shadow=REVISION    shadow (0 % of the traffic)
      https://cloud.google.com/sdk/gcloud/reference/run/services/update-traffic
      https://cloud.google.com/run/docs/rollouts-rollbacks-traffic-migration

The shadow revision is reached at its tag's URL (https://shadow---...), where a push
subscription of its own (infra/) gives it a copy of every ride; it publishes to the shadow
topic, which no backend reads. A version that has had a revision before (a rollback) gets
that revision back: a traffic move, in seconds. A revision that cannot load its model never
becomes ready, and traffic stays where it was.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from typing import Any

from rollout.reconcile import Deployment, RevisionNotReady

GCLOUD_TIMEOUT_SECONDS = 600  # a revision starts in seconds; a stuck one is given up on
SHADOW_TAG = "shadow"


class CloudRunFunctionTarget:
    """One role of the function's Cloud Run service: ``production`` (the revision riders' rides go to)
    or ``shadow`` (the revision tagged shadow, with no traffic of its own)."""

    def __init__(self, service: str, project: str, region: str, role: str, results_topic: str):
        if role not in ("production", SHADOW_TAG):
            raise ValueError(f"role is production or {SHADOW_TAG}, not {role!r}")
        self.service, self.project, self.region, self.role = service, project, region, role
        self.results_topic = results_topic
        self.name = f"Cloud Run service {service} ({role})"

    # --- the commands -------------------------------------------------------------------------
    def _where(self) -> list[str]:
        return [f"--project={self.project}", f"--region={self.region}"]

    def describe_command(self) -> list[str]:
        return ["gcloud", "run", "services", "describe", self.service, *self._where(), "--format=json"]

    def revision_command(self, revision: str) -> list[str]:
        return ["gcloud", "run", "revisions", "describe", revision, *self._where(), "--format=json"]

    def revisions_command(self) -> list[str]:
        return ["gcloud", "run", "revisions", "list", f"--service={self.service}", *self._where(), "--format=json"]

    def model_env(self, model: Deployment) -> dict[str, str]:
        """What a revision of this role is given: the model's identity, where it answers, and who it is."""
        return {
            "RUN_ID": model.run_id,
            "MODEL_URI": model.artifact_uri,
            "MODEL_VERSION": model.version,
            "BACKEND_PULL_STREAM": self.results_topic,
            "DEPLOYMENT_NAME": self.service if self.role == "production" else f"{self.service}-{SHADOW_TAG}",
        }

    def new_revision_command(self, model: Deployment, suffix: str) -> list[str]:
        env = ",".join(f"{k}={v}" for k, v in self.model_env(model).items())
        return [
            "gcloud",
            "run",
            "services",
            "update",
            self.service,
            *self._where(),
            "--no-traffic",  # riders (or the shadow's copy) move only once it is ready, below
            f"--revision-suffix={suffix}",
            f"--update-env-vars={env}",
        ]

    def traffic_command(self, revision: str) -> list[str]:
        move = f"--to-revisions={revision}=100" if self.role == "production" else f"--update-tags={SHADOW_TAG}={revision}"
        return ["gcloud", "run", "services", "update-traffic", self.service, *self._where(), move]

    # --- the target ---------------------------------------------------------------------------
    def _gcloud(self, command: list[str]) -> str:
        done = subprocess.run(command, capture_output=True, text=True, timeout=GCLOUD_TIMEOUT_SECONDS, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:5])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done.stdout

    def _serving_revision(self) -> str | None:
        traffic = (json.loads(self._gcloud(self.describe_command()) or "{}").get("status") or {}).get("traffic") or []
        if self.role == SHADOW_TAG:
            tagged = [t for t in traffic if t.get("tag") == SHADOW_TAG]
            return tagged[0].get("revisionName") if tagged else None
        routed = sorted((t for t in traffic if t.get("percent")), key=lambda t: -t["percent"])
        return routed[0].get("revisionName") if routed else None

    @staticmethod
    def _env(revision: dict[str, Any]) -> dict[str, str]:
        containers = (revision.get("spec") or {}).get("containers") or [{}]
        return {e["name"]: e.get("value", "") for e in containers[0].get("env") or []}

    def serving(self) -> Deployment | None:
        revision_name = self._serving_revision()
        if revision_name is None:
            return None
        revision = json.loads(self._gcloud(self.revision_command(revision_name)))
        env = self._env(revision)
        if not env.get("RUN_ID"):
            return None
        created = (revision.get("metadata") or {}).get("creationTimestamp")
        deployed_at = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp() if created else None
        return Deployment(env.get("MODEL_VERSION", ""), env["RUN_ID"], env.get("MODEL_URI", ""), deployed_at)

    @staticmethod
    def _image(spec_holder: dict[str, Any]) -> str:
        containers = (spec_holder.get("spec") or {}).get("containers") or [{}]
        return containers[0].get("image", "")

    def _existing_revision(self, model: Deployment) -> str | None:
        """A ready revision that already serves ``model`` in this role with the service's current image (a rollback
        reuses it: no new revision; one of an older image would roll the function's code back too). A revision of
        that model and image that failed readiness raises RevisionNotReady: no new revision is made for it."""
        wanted = self.model_env(model)
        service = json.loads(self._gcloud(self.describe_command()) or "{}")
        image = self._image((service.get("spec") or {}).get("template") or {})
        for revision in json.loads(self._gcloud(self.revisions_command()) or "[]"):
            env = self._env(revision)
            if not all(env.get(k) == wanted[k] for k in ("RUN_ID", "MODEL_VERSION", "BACKEND_PULL_STREAM")):
                continue
            if self._image(revision) != image:
                continue
            ready = [c for c in revision.get("status", {}).get("conditions", []) if c.get("type") == "Ready"]
            if ready and ready[0].get("status") == "True":
                return revision["metadata"]["name"]
            if ready and ready[0].get("status") == "False":
                name = revision["metadata"]["name"]
                raise RevisionNotReady(f"revision {name} failed readiness: {ready[0].get('message', '')[:500]}")
        return None

    def retire(self) -> None:
        """Shadow only: no version is wanted there (no challenger alias); the tag goes, and with it the copies."""
        if self.role != SHADOW_TAG:
            raise RuntimeError("production is never retired: riders would have nothing answering them")
        self._gcloud(["gcloud", "run", "services", "update-traffic", self.service, *self._where(), f"--remove-tags={SHADOW_TAG}"])

    def deploy(self, model: Deployment) -> None:
        revision = self._existing_revision(model)
        if revision is None:
            suffix = f"{self.role[0]}-v{model.version}-{int(time.time())}"
            self._gcloud(self.new_revision_command(model, suffix))  # returns once the revision is ready
            revision = f"{self.service}-{suffix}"
        self._gcloud(self.traffic_command(revision))
