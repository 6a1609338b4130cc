"""ridestream on your own Google Cloud project: from an empty project to a ride answered, and back.

    python -m operations.gcp up --project P [--region R] [--env E] [--dry-run]
    python -m operations.gcp status --project P        # registry, deployed, answering, live quality (exit 1: mismatch)
    python -m operations.gcp rollback --project P      # production <- previous; the controller follows
    python -m operations.gcp proxy --project P         # the MLflow UI on localhost, through Cloud Run IAM
    python -m operations.gcp down --project P [--yes]  # everything, the state bucket last

`up` is idempotent and resumable: each step looks first at what is there, says what it found and
what it did, and stops at the first failure (run it again to go on). `--dry-run` prints every
command and API call `up` (or `down`) would make, in order, as on an empty project, and calls
nothing. Every name after the bootstrap comes from Terraform's outputs ({bootstrap.<output>} and
{system.<output>} in the plan), never from a local default. docs/deploy-gcp.md has the detail.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP, SYSTEM = "infra/bootstrap", "infra"  # Terraform's two roots (docs/deploy-gcp-infra.md)
ROOTS = {"bootstrap": BOOTSTRAP, "system": SYSTEM}
# The images Cloud Build makes, as root 2's variables name them: from a Dockerfile (operations/cloudbuild.yaml),
# or the function from its source folder with Google's buildpacks (operations/cloudbuild-function.yaml), as
# Cloud Run functions builds one: Terraform's build_config starts no build, so the image must exist before it.
IMAGES = {
    "backend": "backend/Dockerfile",
    "mlflow": "tracking_server/Dockerfile",
    "rollout": "rollout/Dockerfile",
    "flows": "flows/Dockerfile",
    "function": "serving_function",
}
# Where training looks for its months (infra/flows.tf: trip_data), filled from data/ on a first `up`.
TRIP_DATA = "{system.model_bucket}/trip-data/"
# What `up` enables itself before Terraform can: the APIs Terraform's own calls and the billing check go through
# (root 1 enables every other one, and keeps these enabled too).
FIRST_APIS = ("serviceusage.googleapis.com", "cloudresourcemanager.googleapis.com", "cloudbilling.googleapis.com")
# The deployer's roles (docs/deploy-gcp.md), each with one permission it carries: testIamPermissions
# on the project answers for roles granted on the project, its folder or organization, and through groups.
DEPLOYER_ROLES = {
    "roles/serviceusage.serviceUsageAdmin": "serviceusage.services.enable",
    "roles/storage.admin": "storage.buckets.create",
    "roles/artifactregistry.admin": "artifactregistry.repositories.create",
    "roles/cloudbuild.builds.editor": "cloudbuild.builds.create",
    "roles/iam.serviceAccountAdmin": "iam.serviceAccounts.create",
    "roles/iam.serviceAccountUser": "iam.serviceAccounts.actAs",
    "roles/resourcemanager.projectIamAdmin": "resourcemanager.projects.setIamPolicy",
    "roles/run.admin": "run.services.setIamPolicy",
    "roles/pubsub.admin": "pubsub.topics.create",
    "roles/cloudsql.admin": "cloudsql.instances.create",
    "roles/secretmanager.admin": "secretmanager.secrets.create",
    "roles/redis.admin": "redis.instances.create",
    "roles/compute.networkAdmin": "compute.networks.create",
    "roles/cloudscheduler.admin": "cloudscheduler.jobs.create",
    "roles/logging.configWriter": "logging.sinks.create",
    "roles/monitoring.editor": "monitoring.alertPolicies.create",
}
TOKEN_SECONDS = 50 * 60  # a Google ID token lives an hour; a fresh one well before that
FIRST_MODEL_MINUTES = 45  # training on the job's data, then the controller's pre-flight and rollout
SMOKE_MINUTES = 10  # cold starts of the backend, the function and its model
PLACEHOLDER = re.compile(r"\{(bootstrap|system)\.([a-z_]+)(?:\.([a-z_]+))?\}")


class StepFailed(RuntimeError):
    """A step found something it cannot go on from; the message says what to do."""


def state_bucket(project: str) -> str:
    return f"{project}-ridestream-tfstate"


def image_tag() -> str:
    """The checkout's short commit; with uncommitted changes, plus the tree they make (a content hash: a changed
    file is a new tag, the same files the same tag, so an image at its tag is always this checkout's)."""

    def git(*args: str, env: dict | None = None) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True, env=env).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD")
    if not git("status", "--porcelain"):
        return commit
    import os

    with tempfile.TemporaryDirectory() as scratch:  # a throwaway index: the real one is never touched
        env = os.environ | {"GIT_INDEX_FILE": f"{scratch}/index"}
        git("add", "--all", env=env)
        tree = git("write-tree", env=env)
    return f"{commit}-dirty-{tree[:8]}"


@dataclass(frozen=True)
class Action:
    """One command or API call of a plan. ``changes``: False for a check that only reads."""

    step: str
    argv: tuple[str, ...]
    changes: bool
    note: str = ""

    def text(self) -> str:
        line = shlex.join(self.argv) if not self.is_api else " ".join(self.argv)
        return line + (f"    # {self.note}" if self.note else "")

    @property
    def is_api(self) -> bool:
        return self.argv[0] in ("GET", "POST")


@dataclass
class Context:
    """Where `up`, `down`, `status` and `rollback` run: the project, and either Google Cloud or a dry run."""

    project: str
    region: str
    env: str
    dry_run: bool
    yes: bool = False
    actions: list[Action] = field(default_factory=list)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    step: str = ""
    _tokens: dict[str, tuple[float, str]] = field(default_factory=dict)
    _account: str | None = None

    # --- what every step does through ------------------------------------------------------------
    def say(self, message: str) -> None:
        print(f"  {message}", flush=True)

    def begin(self, step: str, what: str) -> None:
        self.step = step
        print(f"\n== {step}: {what}", flush=True)

    def value(self, text: str) -> str:
        """A plan's text with {root.output[.key]} replaced by Terraform's output (kept as written in a dry run)."""

        def one(match: re.Match) -> str:
            root, name, key = match.groups()
            if self.dry_run:
                return match.group(0)
            outputs = self.outputs.get(root)
            if outputs is None:
                raise StepFailed(f"{match.group(0)}: root {root} has no outputs yet (is it applied?)")
            if name not in outputs:
                raise StepFailed(f"{match.group(0)}: root {root} has no output {name} (infra/ and this file disagree)")
            found = outputs[name]
            return str(found[key] if key else found)

        return PLACEHOLDER.sub(one, text)

    def _record(self, argv: list[str], changes: bool, note: str) -> Action:
        action = Action(self.step, tuple(argv), changes, note)
        self.actions.append(action)
        if self.dry_run:
            print(f"  {'$' if changes else '?'} {action.text()}", flush=True)
        return action

    def check(self, argv: list[str], note: str = "") -> str | None:
        """A read-only command: its stdout, or None when it fails (absent). A dry run plans for an empty project."""
        self._record(argv, False, note)
        if self.dry_run:
            return None
        done = subprocess.run([self.value(a) for a in argv], capture_output=True, text=True, cwd=REPO, check=False)
        return done.stdout if done.returncode == 0 else None

    def run(self, argv: list[str], note: str = "", capture: bool = False) -> str:
        """A command that changes something; its failure stops `up` with gcloud's or Terraform's own words."""
        self._record(argv, True, note)
        if self.dry_run:
            return ""
        resolved = [self.value(a) for a in argv]
        self.say(f"$ {shlex.join(resolved)}")
        done = subprocess.run(resolved, cwd=REPO, text=True, capture_output=capture, check=False)
        if done.returncode != 0:
            raise StepFailed(f"{shlex.join(resolved[:4])} ... failed ({done.returncode}) {(done.stderr or '')[-2000:]}")
        return done.stdout or ""

    def api(self, method: str, url: str, note: str, call: Callable[[str], Any]) -> Any:
        """An HTTP call of ours (not gcloud's): planned as METHOD URL, made by ``call`` with the URL resolved."""
        self._record([method, url], method != "GET", note)
        return None if self.dry_run else call(self.value(url))

    def terraform_outputs(self, root: str) -> dict[str, Any]:
        """`terraform output -json` of a root, as {name: value}; the only source of names after it is applied."""
        text = self.check(["terraform", f"-chdir={ROOTS[root]}", "output", "-json"], f"{root}'s outputs")
        outputs = {name: entry["value"] for name, entry in json.loads(text or "{}").items()}
        self.outputs[root] = outputs
        if not outputs and not self.dry_run:
            raise StepFailed(f"terraform -chdir={ROOTS[root]} output -json has nothing: is {root} applied?")
        return outputs

    def account(self) -> str:
        if self._account is None:
            found = self.check(["gcloud", "config", "get-value", "account"], "who runs this")
            self._account = (found or "").strip() or "<your account>"
        return self._account

    def id_token(self, audience: str) -> str:
        """operations.deploy's ID token for a Cloud Run service behind IAM, fetched again before its hour is up."""
        from operations.deploy import id_token

        cached = self._tokens.get(audience)
        if cached and time.time() - cached[0] < TOKEN_SECONDS:
            return cached[1]
        self._tokens[audience] = (time.time(), id_token(audience))
        return self._tokens[audience][1]

    def use_registry(self) -> None:
        """The MLflow client of this process, pointed at the deployed server with an ID token (Cloud Run IAM)."""
        from operations.deploy import use_registry

        use_registry(self.outputs["system"])

    def get_json(self, url: str, audience: str | None = None, timeout: float = 30) -> dict[str, Any]:
        import requests

        headers = {"Authorization": f"Bearer {self.id_token(audience)}"} if audience else {}
        response = requests.get(url, headers=headers, timeout=timeout)
        response.raise_for_status()
        return response.json()

    def confirm(self, question: str) -> None:
        if self.yes or self.dry_run:
            return
        if input(f"{question} Type the project id to go on: ").strip() != self.project:
            raise StepFailed("not confirmed: nothing was changed")

    # --- shared pieces -----------------------------------------------------------------------------
    def where(self) -> list[str]:
        return [f"--project={self.project}", f"--region={self.region}"]

    def init(self, root: str) -> None:
        """Terraform's state in the state bucket, one prefix per env and root. -reconfigure: a checkout that
        last pointed at another project or env switches to this one instead of offering to migrate its state."""
        bucket = state_bucket(self.project)
        self.run(
            [
                "terraform",
                f"-chdir={ROOTS[root]}",
                "init",
                "-input=false",
                "-reconfigure",
                f"-backend-config=bucket={bucket}",
                f"-backend-config=prefix={self.env}/{root}",
            ],
            f"{root}'s state in gs://{bucket}/{self.env}/{root}",
            capture=True,
        )

    def root_vars(self) -> list[str]:
        return [f"-var=project_id={self.project}", f"-var=region={self.region}", f"-var=env={self.env}"]

    def system_vars(self, tag: str) -> list[str]:
        images = [f"-var={name}_image={image_ref(name, tag)}" for name in IMAGES]
        account = self.account()
        member = f"{'serviceAccount' if account.endswith('.gserviceaccount.com') else 'user'}:{account}"
        return [
            *self.root_vars(),
            *images,
            "-var=build_service_account={bootstrap.build_service_account}",
            f"-var=mlflow_users={json.dumps([member])}",  # the deployer may use the MLflow UI (proxy) and API
        ]


def image_ref(name: str, tag: str) -> str:
    return f"{{bootstrap.artifact_registry}}/{name}:{tag}"


# --- up -----------------------------------------------------------------------------------------------
def prerequisites(ctx: Context) -> None:
    ctx.begin("prerequisites", "who you are, billing, your roles, Terraform's state bucket")
    account = ctx.check(["gcloud", "auth", "list", "--filter=status:ACTIVE", "--format=value(account)"], "gcloud logged in")
    if not ctx.dry_run:
        if not (account or "").strip():
            raise StepFailed("gcloud has no active account: gcloud auth login")
        ctx.say(f"gcloud account: {account.strip()}")
    adc = ctx.check(["gcloud", "auth", "application-default", "print-access-token"], "Terraform's credentials (ADC)")
    if not ctx.dry_run and not adc:
        raise StepFailed("no application-default credentials for Terraform: gcloud auth application-default login")
    enabled = ctx.check(["gcloud", "services", "list", "--enabled", f"--project={ctx.project}", "--format=value(config.name)"])
    missing = [api for api in FIRST_APIS if api not in (enabled or "").split()]
    if missing:
        ctx.run(["gcloud", "services", "enable", *missing, f"--project={ctx.project}"], "what Terraform's own calls need")
    else:
        ctx.say(f"enabled already: {', '.join(FIRST_APIS)}")
    billing = ctx.check(["gcloud", "billing", "projects", "describe", ctx.project, "--format=value(billingEnabled)"])
    if not ctx.dry_run:
        if (billing or "").strip().lower() != "true":
            raise StepFailed(
                f"billing is not enabled on {ctx.project}: gcloud billing projects link {ctx.project} --billing-account=..."
            )
        ctx.say("billing enabled")
    granted = ctx.api(
        "POST",
        f"https://cloudresourcemanager.googleapis.com/v1/projects/{ctx.project}:testIamPermissions",
        f"the deployer's roles: {len(DEPLOYER_ROLES)} permissions, one per role",
        lambda url: _test_permissions(url, list(DEPLOYER_ROLES.values())),
    )
    if granted is not None:
        lacking = [role for role, permission in DEPLOYER_ROLES.items() if permission not in granted]
        if lacking:
            raise StepFailed(f"you lack (or lack a permission of) {', '.join(lacking)} on {ctx.project}: docs/deploy-gcp.md")
        ctx.say(f"all {len(DEPLOYER_ROLES)} deployer roles' permissions held")
    bucket = f"gs://{state_bucket(ctx.project)}"
    found = ctx.check(["gcloud", "storage", "buckets", "describe", bucket, "--format=json"], "Terraform's state bucket")
    if found is None:
        ctx.run(
            [
                "gcloud",
                "storage",
                "buckets",
                "create",
                bucket,
                f"--project={ctx.project}",
                f"--location={ctx.region}",
                "--uniform-bucket-level-access",
                "--public-access-prevention",
            ],
            "holds the database password (in state): nobody but the deployers reads it",
        )
        ctx.run(["gcloud", "storage", "buckets", "update", bucket, "--versioning"], "a bad apply's state can be restored")
        return
    described = json.loads(found)
    ctx.say(f"{bucket} exists")
    if not (described.get("versioning_enabled") and described.get("uniform_bucket_level_access")):
        ctx.run(["gcloud", "storage", "buckets", "update", bucket, "--versioning", "--uniform-bucket-level-access"])


def _test_permissions(url: str, permissions: list[str]) -> set[str]:
    import requests

    token = subprocess.run(["gcloud", "auth", "print-access-token"], capture_output=True, text=True, check=True).stdout.strip()
    response = requests.post(url, json={"permissions": permissions}, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    response.raise_for_status()
    return set(response.json().get("permissions", []))


def bootstrap(ctx: Context) -> None:
    ctx.begin("bootstrap", "root 1: the APIs, the Artifact Registry repository, the build service account")
    ctx.init("bootstrap")
    ctx.run(["terraform", f"-chdir={BOOTSTRAP}", "apply", "-input=false", "-auto-approve", *ctx.root_vars()])
    outputs = ctx.terraform_outputs("bootstrap")
    if outputs:
        ctx.say(f"artifact_registry {outputs['artifact_registry']}, build_service_account {outputs['build_service_account']}")


def images(ctx: Context, tag: str) -> None:
    ctx.begin("images", f"built by Cloud Build at tag {tag} (no local Docker), each skipped if already there")
    for name, source in IMAGES.items():
        ref = image_ref(name, tag)
        if ctx.check(["gcloud", "artifacts", "docker", "images", "describe", ref, "--format=value(image_summary.digest)"]):
            ctx.say(f"{ctx.value(ref)} is there already")
            continue
        config, substitutions = (
            ("operations/cloudbuild.yaml", f"_DOCKERFILE={source},_IMAGE={ref}")
            if source.endswith("Dockerfile")
            else ("operations/cloudbuild-function.yaml", f"_SOURCE={source},_IMAGE={ref}")
        )
        ctx.run(
            [
                "gcloud",
                "builds",
                "submit",
                f"--config={config}",
                f"--substitutions={substitutions}",
                "--service-account=projects/" + ctx.project + "/serviceAccounts/{bootstrap.build_service_account}",
                # The upload goes where the build account may read it (root 1), not to Cloud Build's default
                # bucket, which a user-specified build account cannot read.
                "--gcs-source-staging-dir=gs://{bootstrap.build_source_bucket}/source",
                *ctx.where(),
                ".",
            ],
            f"the {name} image",
        )


def system(ctx: Context, tag: str) -> None:
    ctx.begin("system", "root 2: everything else, in one apply (no -target)")
    ctx.init("system")
    ctx.run(["terraform", f"-chdir={SYSTEM}", "apply", "-input=false", "-auto-approve", *ctx.system_vars(tag)])
    # What down needs to name the same images again, beside the state (no secret in it).
    _save_vars(ctx, dict(a[len("-var=") :].split("=", 1) for a in ctx.system_vars(tag)))
    outputs = ctx.terraform_outputs("system")
    if outputs:
        ctx.say(f"backend {outputs['backend_url']}, MLflow {outputs['mlflow_url']}, function {outputs['function_service']}")


def _save_vars(ctx: Context, variables: dict[str, str]) -> None:
    """The variables of this apply, beside its state: `down` (on any machine) names the same images again."""
    local = Path(tempfile.gettempdir()) / f"ridestream-{ctx.project}-{ctx.env}.tfvars.json"
    if not ctx.dry_run:
        values = {k: ctx.value(v) for k, v in variables.items()}
        local.write_text(json.dumps({k: json.loads(v) if v.startswith("[") else v for k, v in values.items()}))
    ctx.run(["gcloud", "storage", "cp", str(local), f"gs://{state_bucket(ctx.project)}/{ctx.env}/system.tfvars.json"])


def first_model(ctx: Context) -> None:
    ctx.begin("first model", "the training job registers a version and sets production; the controller rolls it out")
    production = ctx.api(
        "GET",
        "{system.mlflow_url}/api/2.0/mlflow/registered-models/alias",
        "is there a production model already (ID token)",
        lambda _url: _registry_production(ctx),
    )
    if production is None:
        # Training lists its months under trip_data: on a new project there are none, so the real TLC months
        # committed in data/ go there first (2021-01 to 2021-03: the three consecutive months it needs).
        if not ctx.check(["gcloud", "storage", "ls", TRIP_DATA]):
            months = sorted(str(p.relative_to(REPO)) for p in (REPO / "data").glob("green_tripdata_*.parquet"))
            ctx.run(["gcloud", "storage", "cp", *months, TRIP_DATA], "the TLC months in data/, for training to read")
        ctx.run(["gcloud", "run", "jobs", "execute", "{system.jobs.training}", *ctx.where(), "--wait"], "training, as scheduled")
    else:
        ctx.say(f"the registry's production is v{production} already: no training")
    ctx.api(
        "GET",
        "{system.rollout_url}/status",
        f"every 15 s, up to {FIRST_MODEL_MINUTES} min, until production is deployed (ID token)",
        lambda url: _wait_in_sync(ctx, url, FIRST_MODEL_MINUTES * 60),
    )


def _registry_production(ctx: Context) -> str | None:
    from training import registry

    ctx.use_registry()
    return registry.current_version(registry.PRODUCTION)


def _wait_in_sync(ctx: Context, url: str, seconds: float, version: str | None = None) -> dict[str, Any]:
    """The controller's own view until production (``version``, if given) is deployed; its phase meanwhile,
    once a minute. The controller reads the registry afresh for each /status, so a moved alias is out of sync
    at once, until its rollout is done."""
    audience = url.rsplit("/status", 1)[0]
    deadline, said = time.monotonic() + seconds, 0.0
    while True:
        try:
            production = ctx.get_json(url, audience)["aliases"]["production"]
        except Exception as exc:  # a cold controller or a token refresh: asked again
            production = {"state": f"no answer ({type(exc).__name__})"}
        if production.get("in_sync") and version in (None, str((production.get("serving") or {}).get("version"))):
            ctx.say(f"production v{production['serving']['version']} deployed: {production['target']}")
            return production
        if time.monotonic() > deadline:
            raise StepFailed(f"production is not deployed after {seconds / 60:.0f} min: {json.dumps(production)[:1500]}")
        if time.monotonic() - said > 60:
            ctx.say(f"controller: {production.get('state')} {production.get('phase') or ''} {production.get('last_error') or ''}")
            said = time.monotonic()
        time.sleep(15)


def smoke_test(ctx: Context) -> dict[str, Any] | None:
    ctx.begin("smoke test", "a real ride from data/ to the public backend, until its final answer")
    return ctx.api(
        "POST",
        "{system.backend_url}/predict?wait=10",
        f"a March 2021 ride; then GET /rides/<id>?wait=10 up to {SMOKE_MINUTES} min",
        lambda url: _ride(url.rsplit("/predict", 1)[0], SMOKE_MINUTES * 60, ctx),
    )


def a_real_ride() -> dict[str, Any]:
    """One ride of the test month, as a rider's app sends it (the first the backend accepts)."""
    from data import load_trips
    from ride_contract.ride import MAX_TRIP_DISTANCE_MILES

    trips = load_trips(REPO / "data" / "green_tripdata_2021-03.parquet")
    row = next(r for r in trips.itertuples() if 0 < r.trip_distance <= MAX_TRIP_DISTANCE_MILES)
    return {
        "datetime": row.datetime.strftime("%Y-%m-%d %H:%M:%S"),
        "PULocationID": int(row.PULocationID),
        "DOLocationID": int(row.DOLocationID),
        "trip_distance": float(row.trip_distance),
    }


def _ride(backend: str, seconds: float, ctx: Context) -> dict[str, Any]:
    import requests

    ride = a_real_ride() | {"ride_id": f"smoke-{uuid.uuid4().hex[:12]}"}
    deadline = time.monotonic() + seconds
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            if not record:  # the same ride_id again is idempotent: a retried POST never makes two rides
                response = requests.post(f"{backend}/predict?wait=10", json=ride, timeout=30)
            else:
                response = requests.get(f"{backend}/rides/{ride['ride_id']}?wait=10", timeout=30)
        except requests.RequestException as exc:
            ctx.say(f"backend: {type(exc).__name__}, asking again")
            time.sleep(5)
            continue
        if response.status_code in (401, 403):
            raise StepFailed(f"{backend} answers {response.status_code}: the backend is not public (backend_invokers)")
        if response.status_code >= 500:
            time.sleep(5)
            continue
        record = response.json()
        if record.get("status") == "done":
            ctx.say(
                f"ride {ride}: coarse {record.get('duration_coarse')} min, final {record.get('duration_final')} min "
                f"from model v{record.get('model_version')}"
            )
            return record
    raise StepFailed(f"no final answer within {seconds / 60:.0f} min: {record or 'no answer at all'}")


def up(ctx: Context) -> int:
    tag = image_tag()
    print(f"ridestream up: project {ctx.project}, region {ctx.region}, env {ctx.env}, images at {tag}")
    prerequisites(ctx)
    bootstrap(ctx)
    images(ctx, tag)
    system(ctx, tag)
    first_model(ctx)
    smoke_test(ctx)
    return status(ctx)


# --- status, rollback, proxy -------------------------------------------------------------------------
def system_outputs(ctx: Context) -> dict[str, Any]:
    """Names from the deployed system's own Terraform outputs (state in the bucket)."""
    ctx.init("system")
    return ctx.terraform_outputs("system")


def status(ctx: Context) -> int:
    """Registry, deployed, answering, live quality; 1 when they disagree."""
    ctx.begin("status", "registry vs deployed vs answering riders, and live quality")
    if "system" not in ctx.outputs:
        system_outputs(ctx)
    registry_version = ctx.api(
        "GET", "{system.mlflow_url}", "the registry's production (ID token)", lambda _u: _registry_production(ctx)
    )
    ctx.check(["gcloud", "run", "services", "describe", "{system.function_service}", *ctx.where(), "--format=json"])
    ctx.api("GET", "{system.rollout_url}/status", "the controller's view (ID token)", lambda _u: None)
    ctx.api("POST", "{system.backend_url}/predict?wait=10", "a real ride's final names its model", lambda _u: None)
    ctx.api("GET", "{system.backend_url}/readyz", "live quality per version", lambda _u: None)
    if ctx.dry_run:
        return 0
    from operations.deploy import function_target

    deployed = function_target(ctx.outputs["system"]).serving()
    controller = ctx.get_json(ctx.value("{system.rollout_url}/status"), ctx.value("{system.rollout_url}"))
    answered = _ride(ctx.value("{system.backend_url}"), 120, ctx)
    readiness = ctx.get_json(ctx.value("{system.backend_url}/readyz"))
    report = {
        "registry": {"production": registry_version},
        "deployed": {"service": ctx.outputs["system"]["function_service"], "version": deployed.version if deployed else None},
        "answering": {"model_version": answered.get("model_version"), "ride_id": answered.get("ride_id")},
        "controller": {a: {"state": e.get("state"), "phase": e.get("phase")} for a, e in controller["aliases"].items()},
        "live_quality": readiness.get("live_quality"),
    }
    print(json.dumps(report, indent=2))
    versions = {registry_version, report["deployed"]["version"], str(report["answering"]["model_version"])}
    if len(versions) != 1:
        print(f"MISMATCH: registry v{registry_version}, deployed v{report['deployed']['version']}, "
              f"answering v{report['answering']['model_version']}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def rollback(ctx: Context, break_glass: bool = False) -> int:
    """production <- previous in the registry; the controller rolls the function back (pre-flight, switch).
    --break-glass: without the controller, operations.deploy's redeploy (pre-flight, revision, traffic)."""
    ctx.begin("rollback", "production <- previous in the registry, then the function follows")
    system_outputs(ctx)
    if ctx.dry_run:
        ctx.api("POST", "{system.mlflow_url}/api/2.0/mlflow/registered-models/alias", "production <- previous", lambda _u: None)
        ctx.api("GET", "{system.rollout_url}/status", "until production is deployed (ID token)", lambda _u: None)
        return 0
    from training import registry

    ctx.use_registry()
    try:
        version = registry.rollback()
    except LookupError as exc:
        raise StepFailed(str(exc)) from None
    ctx.say(f"the registry's production is v{version} again")
    if break_glass:
        from operations.deploy import function_target, redeploy

        return redeploy(registry.PRODUCTION, target=function_target(ctx.outputs["system"]))
    _wait_in_sync(ctx, ctx.value("{system.rollout_url}/status"), 15 * 60, version)
    return 0


def proxy(ctx: Context, port: int) -> int:
    """The MLflow UI in a browser: gcloud's proxy sends your identity to Cloud Run IAM (a browser alone gets 403)."""
    ctx.begin("proxy", "the MLflow UI through gcloud run services proxy")
    system_outputs(ctx)
    print(f"open http://localhost:{port} (Ctrl-C stops the proxy)", flush=True)
    command = ["gcloud", "run", "services", "proxy", "{system.mlflow_service}", *ctx.where(), f"--port={port}"]
    ctx._record(command, False, "runs until Ctrl-C")
    if ctx.dry_run:
        return 0
    try:
        return subprocess.call([ctx.value(a) for a in command])
    except KeyboardInterrupt:
        return 0


# --- down -------------------------------------------------------------------------------------------
def down(ctx: Context) -> int:
    """Root 2 (deletion protection lifted first, by name), root 1, then the state bucket (if no other env is in it)."""
    bucket = f"gs://{state_bucket(ctx.project)}"
    ctx.begin("down", f"everything ridestream-{ctx.env} made in {ctx.project}, and its state")
    ctx.confirm(f"This deletes ridestream-{ctx.env} in {ctx.project}: the database, the models, every ride.")
    variables = str(Path(tempfile.gettempdir()) / f"ridestream-{ctx.project}-{ctx.env}.tfvars.json")
    saved = ctx.check(["gcloud", "storage", "cp", f"{bucket}/{ctx.env}/system.tfvars.json", variables], "up's variables")
    if saved is not None or ctx.dry_run:
        system_outputs(ctx)
        protected = ctx.outputs.get("system", {}).get("deletion_protected", ["{system.deletion_protected}"])
        targets = [f"-target={address}" for address in protected]
        var_file = [f"-var-file={variables}"]
        if not targets:
            ctx.say("no resource carries deletion protection any more")
        else:
            ctx.run(
                [
                    "terraform",
                    f"-chdir={SYSTEM}",
                    "apply",
                    "-input=false",
                    "-auto-approve",
                    *var_file,
                    "-var=deletion_protection=false",
                    *targets,
                ],
                "deletion protection lifted on exactly these resources",
            )
        ctx.run(
            [
                "terraform",
                f"-chdir={SYSTEM}",
                "destroy",
                "-input=false",
                "-auto-approve",
                *var_file,
                "-var=deletion_protection=false",
            ]
        )
    else:
        ctx.say(f"no {bucket}/{ctx.env}/system.tfvars.json: the system root was never applied (or is gone)")
    ctx.init("bootstrap")
    ctx.run(["terraform", f"-chdir={BOOTSTRAP}", "destroy", "-input=false", "-auto-approve", *ctx.root_vars()])
    ctx.run(["gcloud", "storage", "rm", "--recursive", "--all-versions", f"{bucket}/{ctx.env}/"], f"env {ctx.env}'s state")
    others = ctx.check(["gcloud", "storage", "ls", f"{bucket}/"], "another env's state?")
    if others and others.strip():
        ctx.say(f"{bucket} keeps other envs' state: {' '.join(others.split())}")
        return 0
    ctx.run(["gcloud", "storage", "rm", "--recursive", "--all-versions", bucket], "the state bucket, last")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m operations.gcp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["up", "down", "status", "rollback", "proxy"])
    parser.add_argument("--project", required=True, help="your Google Cloud project id")
    parser.add_argument("--region", default="europe-west1")
    parser.add_argument("--env", default="prod", help="a name of its own per deployment in one project (names, state)")
    parser.add_argument("--dry-run", action="store_true", help="print every command and API call in order; call nothing")
    parser.add_argument("--yes", action="store_true", help="down: no confirmation")
    parser.add_argument("--break-glass", action="store_true", help="rollback without the controller (operations.deploy)")
    parser.add_argument("--port", type=int, default=5000, help="proxy: the local port")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", args.project):
        parser.error(f"--project {args.project!r} is not a project id (6-30 lower-case letters, digits, hyphens)")
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", args.env):  # infra's own validation, checked before anything is made
        parser.error(f"--env {args.env!r}: up to 8 lower-case letters and digits (it is part of every resource name)")
    ctx = Context(args.project, args.region, args.env, args.dry_run, args.yes)
    actions: dict[str, Callable[[], int]] = {
        "up": lambda: up(ctx),
        "down": lambda: down(ctx),
        "status": lambda: status(ctx),
        "rollback": lambda: rollback(ctx, args.break_glass),
        "proxy": lambda: proxy(ctx, args.port),
    }
    try:
        code = actions[args.action]()
    except StepFailed as exc:
        print(f"\nerror in {ctx.step}: {exc}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"\n(dry run: {len(ctx.actions)} commands and API calls planned, none made)")
    return code


def plan(action: str, project: str, region: str = "europe-west1", env: str = "prod") -> list[Action]:
    """The ordered plan of an action, as --dry-run prints it."""
    ctx = Context(project, region, env, dry_run=True, yes=True)
    {"up": up, "down": down, "status": status, "rollback": rollback}[action](ctx)
    return ctx.actions


if __name__ == "__main__":
    sys.exit(main())
