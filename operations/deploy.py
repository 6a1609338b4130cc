"""Deploy the serving function to Cloud Functions (2nd gen), point it at a new model, or roll it back.

    python -m operations.deploy deploy     # first deployment, RUN_ID of the `production` alias
    python -m operations.deploy redeploy   # after promoting in the MLflow UI: only RUN_ID/MODEL_VERSION change
    python -m operations.deploy rollback   # production <- previous in the registry, then redeploy
    ... --dry-run                          # print the gcloud command (rollback: and change no alias)

The function runs as its own service account (no key files: the runtime's
identity reads the bucket and publishes). Settings come from the environment:
GCP_PROJECT, GCP_REGION, FUNCTION_NAME, FUNCTION_SERVICE_ACCOUNT, MODEL_BUCKET,
BACKEND_PUSH_STREAM, BACKEND_PULL_STREAM, BACKEND_DEADLETTER_STREAM, plus
MLFLOW_TRACKING_URI to resolve the alias. This is the control plane: it runs on an
operator's machine or in CI, never inside the function.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from training import registry
from training.registry import PRODUCTION, resolve

# What gcloud uploads: the function's folder, as it is (see its .gcloudignore).
SOURCE_DIR = Path(__file__).resolve().parent.parent / "serving_function"
ENTRY_POINT = "predict_duration_cloudevent"
RUNTIME = "python312"


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        raise SystemExit(f"error: set {name}")
    return value


def _base_command() -> list[str]:
    return [
        "gcloud",
        "functions",
        "deploy",
        _env("FUNCTION_NAME", "predict-duration"),
        "--gen2",
        f"--project={_env('GCP_PROJECT')}",
        f"--region={_env('GCP_REGION', 'europe-west1')}",
        f"--source={SOURCE_DIR}",
        f"--entry-point={ENTRY_POINT}",
    ]


def deploy_command(alias: str = PRODUCTION) -> list[str]:
    model = resolve(alias)
    env_vars = {
        "PROJECT_ID": _env("GCP_PROJECT"),
        "RUN_ID": model.run_id,
        "MODEL_VERSION": model.version,
        "MODEL_BUCKET": _env("MODEL_BUCKET"),
        "BACKEND_PULL_STREAM": _env("BACKEND_PULL_STREAM", "backend-pull-stream"),
        "BACKEND_DEADLETTER_STREAM": _env("BACKEND_DEADLETTER_STREAM", "backend-deadletter-stream"),
        # Concurrency comes from requests (micro-batched), not from OpenMP threads per prediction.
        "OMP_NUM_THREADS": "1",
    }
    return [
        *_base_command(),
        f"--runtime={RUNTIME}",
        f"--trigger-topic={_env('BACKEND_PUSH_STREAM', 'backend-push-stream')}",
        f"--service-account={_env('FUNCTION_SERVICE_ACCOUNT')}",
        # The model (~2 MB) and sklearn load in a few seconds; 1 GiB leaves room for pandas.
        "--memory=1Gi",
        "--retry",  # failed deliveries (publish errors) are retried; poison messages are dead-lettered by the code
        "--set-env-vars=" + ",".join(f"{k}={v}" for k, v in env_vars.items()),
    ]


def redeploy_command(alias: str = PRODUCTION) -> list[str]:
    """Same function and source, only the model identity changes."""
    model = resolve(alias)
    return [*_base_command(), f"--update-env-vars=RUN_ID={model.run_id},MODEL_VERSION={model.version}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["deploy", "redeploy", "rollback"])
    parser.add_argument("--alias", default=PRODUCTION)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

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
    command = deploy_command(alias) if args.action == "deploy" else redeploy_command(alias)
    print(shlex.join(command))
    if args.dry_run:
        return 0
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
