"""Deploy the serving function to Cloud Functions (2nd gen), point it at a new model, or roll it back.

    python -m operations.deploy deploy     # first deployment (the code), the model of the `production` alias
    python -m operations.deploy redeploy   # break-glass: serve what the registry's production says now
    python -m operations.deploy rollback   # production <- previous in the registry, then redeploy
    python -m operations.deploy status     # the registry's production beside what the function's service serves
    ... --dry-run                          # print the gcloud commands (rollback: and change no alias)
    ... --infra DIR                        # the Terraform root whose outputs name everything (default infra/)

With the rollout service running (infra/), a promotion in the registry reaches riders by
itself, guarded (pre-flight, shadow analysis, bake: rollout/); redeploy and rollback here are
for an operator without it. They run the pre-flight too, then change only which model serves:
a revision of the function's Cloud Run service with the model's identity, and its traffic
(rollout.cloud): no source upload, no build. redeploy, rollback and status take every name from
the deployed system's Terraform outputs (`terraform output -json` of infra/: project_id, region,
function_service, topics, mlflow_url), never from a local default: a topic name guessed here once
sent every final to a topic that did not exist, with pre-flight passed and exit 0 (issue 32).
The MLflow server behind Cloud Run IAM gets an ID token (gcloud auth print-identity-token).
The function runs as its own service account, and its Pub/Sub trigger invokes it as
another one that may invoke this function only (no key files anywhere). Settings come
from the environment: GCP_PROJECT, GCP_REGION, FUNCTION_NAME, FUNCTION_SERVICE_ACCOUNT,
FUNCTION_TRIGGER_SERVICE_ACCOUNT, FUNCTION_BUILD_SERVICE_ACCOUNT (optional),
FUNCTION_MAX_INSTANCES, MODEL_BUCKET, BACKEND_PUSH_STREAM, BACKEND_PULL_STREAM,
BACKEND_DEADLETTER_STREAM, plus MLFLOW_TRACKING_URI to resolve the alias. This is the
control plane: it runs on an operator's machine or in CI, never inside the function.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from rollout.cloud import CloudRunFunctionTarget
from rollout.reconcile import Deployment
from training import registry
from training.registry import PRODUCTION, ResolvedModel, resolve

INFRA = Path(__file__).resolve().parent.parent / "infra"  # the system's Terraform root (its state: the state bucket)
# What gcloud uploads: the function's folder, as it is (see its .gcloudignore).
SOURCE_DIR = Path(__file__).resolve().parent.parent / "serving_function"
ENTRY_POINT = "predict_duration_cloudevent"
# One Python for training, the function and the backend image (tests/test_repository.py checks).
PYTHON_VERSION = "3.11"
RUNTIME = "python" + PYTHON_VERSION.replace(".", "")
# A ride costs well under a millisecond to score (the serving form), so an instance takes
# many at once; one CPU, as Terraform sets it.
CONCURRENCY = 16
CPU = "1"
MEMORY = "1Gi"
MAX_INSTANCES = 20  # as infra/ deploys it (tests/test_infra.py ties the two)


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        raise SystemExit(f"error: set {name}")
    return value


def _function(name: str | None = None) -> list[str]:
    return [
        name or _env("FUNCTION_NAME", "predict-duration"),  # the function's name in Cloud Functions
        f"--project={_env('GCP_PROJECT')}",  # the project the function runs in, its PROJECT_ID too
        f"--region={_env('GCP_REGION', 'europe-west1')}",  # the region it is deployed in
    ]


def _base_command(name: str | None = None) -> list[str]:
    return ["gcloud", "functions", "deploy", *_function(name), "--gen2", f"--source={SOURCE_DIR}", f"--entry-point={ENTRY_POINT}"]


def _model_env(model: ResolvedModel) -> dict[str, str]:
    """What redeploy owns: the model's identity. MODEL_URI makes a cold start read exactly one folder."""
    return {"RUN_ID": model.run_id, "MODEL_URI": model.artifact_uri, "MODEL_VERSION": model.version}


def deploy_commands(alias: str = PRODUCTION) -> list[list[str]]:
    """The deployment, then the trigger identity's right to invoke this function (and nothing else)."""
    model = resolve(alias)
    # The identity the Pub/Sub trigger invokes the function as, allowed to invoke this function only.
    trigger_account = _env("FUNCTION_TRIGGER_SERVICE_ACCOUNT")
    env_vars = {
        "PROJECT_ID": _env("GCP_PROJECT"),
        **_model_env(model),
        "MODEL_BUCKET": _env("MODEL_BUCKET"),  # the bucket of the models, the function's MODEL_BUCKET
        # The topic the function publishes results to, its BACKEND_PULL_STREAM.
        "BACKEND_PULL_STREAM": _env("BACKEND_PULL_STREAM", "backend-pull-stream"),
        # The topic of its dead letters (undecodable or invalid rides), its BACKEND_DEADLETTER_STREAM.
        "BACKEND_DEADLETTER_STREAM": _env("BACKEND_DEADLETTER_STREAM", "backend-deadletter-stream"),
        # Concurrency comes from requests (micro-batched), not from OpenMP threads per prediction.
        "OMP_NUM_THREADS": "1",
    }
    deploy = [
        *_base_command(),
        f"--runtime={RUNTIME}",
        f"--trigger-topic={_env('BACKEND_PUSH_STREAM', 'backend-push-stream')}",  # the rides' topic, which triggers it
        f"--service-account={_env('FUNCTION_SERVICE_ACCOUNT')}",  # the service account the function runs as
        f"--trigger-service-account={trigger_account}",
        # The model (~2 MB) and sklearn load in a few seconds; 1 GiB leaves room for pandas.
        f"--memory={MEMORY}",
        f"--cpu={CPU}",
        f"--concurrency={CONCURRENCY}",
        # At most this many instances of the function (the default, MAX_INSTANCES, is what infra/ deploys).
        f"--max-instances={_env('FUNCTION_MAX_INSTANCES', str(MAX_INSTANCES))}",
        "--retry",  # failed deliveries (publish errors) are retried; poison messages are dead-lettered by the code
        "--set-env-vars=" + ",".join(f"{k}={v}" for k, v in env_vars.items()),
    ]
    # The service account Cloud Build builds the function with; empty: gcloud's default.
    if build_account := os.environ.get("FUNCTION_BUILD_SERVICE_ACCOUNT"):
        deploy.append(f"--build-service-account={build_account}")
    invoker = [
        "gcloud",
        "functions",
        "add-invoker-policy-binding",
        *_function(),
        f"--member=serviceAccount:{trigger_account}",
    ]
    return [deploy, invoker]


def terraform_outputs(infra: Path) -> dict[str, Any]:
    """The deployed system's names, as {output: value}: `terraform -chdir=infra output -json`."""
    done = subprocess.run(["terraform", f"-chdir={infra}", "output", "-json"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: terraform -chdir={infra} output -json failed: {done.stderr.strip()[-1000:]}")
    outputs = {name: entry["value"] for name, entry in json.loads(done.stdout or "{}").items()}
    missing = [name for name in ("project_id", "region", "function_service", "topics", "mlflow_url") if name not in outputs]
    if missing:
        raise SystemExit(
            f"error: {infra} has no output {', '.join(missing)}: apply it first (make gcp-up), or "
            f"terraform -chdir={infra} init -backend-config=bucket=<project>-ridestream-tfstate -backend-config=prefix=<env>/system"
        )
    return outputs


def function_target(outputs: dict[str, Any]) -> CloudRunFunctionTarget:
    """The production role of the function's Cloud Run service, named by Terraform's outputs."""
    return CloudRunFunctionTarget(
        outputs["function_service"], outputs["project_id"], outputs["region"], "production", outputs["topics"]["pull"]
    )


def id_token(audience: str) -> str:
    """A Google ID token for a Cloud Run service behind IAM. A user's token from gcloud carries gcloud's own
    audience, which Cloud Run accepts from a user; a service account's (CI) must name the service."""
    account = subprocess.run(["gcloud", "config", "get-value", "account"], capture_output=True, text=True, check=False)
    command = ["gcloud", "auth", "print-identity-token"]
    if account.stdout.strip().endswith(".gserviceaccount.com"):
        command.append(f"--audiences={audience}")
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def use_registry(outputs: dict[str, Any]) -> None:
    """This process's MLflow client, pointed at the deployed server (with an ID token when it is Cloud Run's)."""
    url = outputs["mlflow_url"]
    os.environ["MLFLOW_TRACKING_URI"] = url
    if url.startswith("https://"):
        os.environ["MLFLOW_TRACKING_TOKEN"] = id_token(url)


def redeploy(alias: str = PRODUCTION, dry_run: bool = False, target: CloudRunFunctionTarget | None = None) -> int:
    """Serve the model ``alias`` names, after its pre-flight: a new revision (or the one it had) and the traffic."""
    model = resolve(alias)
    deployment = Deployment(model.version, model.run_id, model.artifact_uri)
    if dry_run:
        suffix = f"p-v{model.version}-<time>"
        for command in (target.new_revision_command(deployment, suffix), target.traffic_command(f"{target.service}-{suffix}")):
            print(shlex.join(command))
        return 0
    from rollout.preflight import run

    verdict = run(model.artifact_uri, model.run_id)
    if not verdict.passed:
        print(f"error: v{model.version} fails its pre-flight, nothing changed: {verdict.reason}", file=sys.stderr)
        return 1
    target.deploy(deployment)
    serving = target.serving()
    print(f"{target.name} serves v{serving.version if serving else '-'} (run {serving.run_id if serving else '-'})")
    return 0 if serving is not None and serving.run_id == model.run_id else 1


def status(target: CloudRunFunctionTarget) -> int:
    """The registry's production beside what the function's service serves; 1 when they differ."""
    wanted = resolve(PRODUCTION)
    serving = target.serving()
    print(json.dumps({"registry": {"version": wanted.version, "run_id": wanted.run_id}, "deployed": serving and vars(serving)}))
    return 0 if serving is not None and serving.run_id == wanted.run_id else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["deploy", "redeploy", "rollback", "status"])
    parser.add_argument("--alias", default=PRODUCTION)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--infra", type=Path, default=INFRA, help="the applied Terraform root whose outputs name everything")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    if args.action == "deploy":
        for command in deploy_commands(args.alias):
            print(shlex.join(command))
            if not args.dry_run and (code := subprocess.call(command)) != 0:
                return code
        return 0
    outputs = terraform_outputs(args.infra)
    use_registry(outputs)
    target = function_target(outputs)
    if args.action == "status":
        return status(target)
    alias = args.alias
    if args.action == "rollback":
        try:
            if args.dry_run:  # change nothing: show the redeploy that the rollback would run
                alias = registry.PREVIOUS
                print(f"would move {PRODUCTION} to version {resolve(alias).version}, then run:")
            else:
                print(f"{PRODUCTION} is version {registry.rollback()} again")
        except (LookupError, MlflowException) as exc:
            print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
            return 2
    return redeploy(alias, args.dry_run, target)


if __name__ == "__main__":
    sys.exit(main())
