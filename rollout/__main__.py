"""The rollout service's commands.

python -m rollout register --url https://rollout-xyz.run.app/webhooks/mlflow   # with ROLLOUT_WEBHOOK_SECRET, MLFLOW_TRACKING_URI
python -m rollout status --url https://rollout-xyz.run.app [--backend URL]      # registry vs served; exit 1 if they differ

The status's details need an operator's identity: ROLLOUT_OPERATOR_TOKEN if set (the local stack's), else
the caller's Google ID token for the service's URL (its e-mail must be in the service's ROLLOUT_OPERATORS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import requests


def judge(report: dict, served: dict | None = None) -> dict:
    """Add ``in_sync`` and ``mismatch`` to a report of aliases (each: registry vs deployed), and what answers riders.

    ``served`` is a backend's ``model_served``: the model behind the latest result it stored. A
    result older than the deployment serving now says nothing yet (no ride since), so it is shown,
    not judged."""
    report["in_sync"] = all(entry["in_sync"] for entry in report["aliases"].values())
    for alias, entry in report["aliases"].items():
        if not entry["in_sync"]:
            registry, serving = entry.get("registry") or {}, entry.get("serving") or {}
            report.setdefault(
                "mismatch", f"{alias}: registry v{registry.get('version', '-')}, deployed v{serving.get('version', '-')}"
            )
    production = report["aliases"].get("production") or {}
    wanted = production.get("registry") or {}
    deployed_at = (production.get("serving") or {}).get("deployed_at")
    if served:
        report["answering_riders"] = served
        fresh = deployed_at is None or served.get("at", 0) >= deployed_at
        if fresh and wanted and served.get("model_run_id") != wanted.get("run_id"):
            report["in_sync"] = False
            answered = f"riders are answered by v{served.get('model_version')}"
            report.setdefault("mismatch", f"{answered}, the registry's production is v{wanted.get('version')}")
    return report


def backend_served(backend_url: str, timeout: float = 30) -> dict | None:
    return requests.get(f"{backend_url.rstrip('/')}/readyz", timeout=timeout).json().get("model_served")


def operator_headers(rollout_url: str) -> dict[str, str]:
    """Who asks: the shared operator token, else this caller's Google ID token for the service (none: public answers)."""
    token = os.environ.get("ROLLOUT_OPERATOR_TOKEN", "")
    if not token:
        try:
            import google.auth.transport.requests
            import google.oauth2.id_token

            token = google.oauth2.id_token.fetch_id_token(google.auth.transport.requests.Request(), rollout_url.rstrip("/"))
        except Exception as exc:  # no credentials here: the public answer (states and versions) is what there is
            print(f"note: no operator identity ({type(exc).__name__}); the status's details are not shown", file=sys.stderr)
            return {}
    return {"Authorization": f"Bearer {token}"}


def status(rollout_url: str, backend_url: str | None = None, timeout: float = 30) -> dict:
    """The rollout service's view (registry alias vs deployed) and, if given, what the backend sees answering."""
    headers = operator_headers(rollout_url)
    report = requests.get(f"{rollout_url.rstrip('/')}/status", headers=headers, timeout=timeout).json()
    return judge(report, backend_served(backend_url, timeout) if backend_url else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rollout", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    register_cmd = sub.add_parser("register", help="create or update the MLflow webhook")
    register_cmd.add_argument("--url", required=True, help="the rollout service's /webhooks/mlflow URL")
    status_cmd = sub.add_parser("status", help="which model the registry calls production, and which one serves")
    status_cmd.add_argument("--url", required=True, help="the rollout service")
    status_cmd.add_argument("--backend", help="a backend replica: what really answers riders")
    args = parser.parse_args(argv)
    if args.command == "register":
        from rollout.register import register_webhook

        secret = os.environ.get("ROLLOUT_WEBHOOK_SECRET", "")
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not (secret and tracking_uri):
            print("error: set ROLLOUT_WEBHOOK_SECRET and MLFLOW_TRACKING_URI", file=sys.stderr)
            return 2
        print(register_webhook(tracking_uri, args.url, secret))
        return 0
    report = status(args.url, args.backend)
    print(json.dumps(report, indent=2))
    return 0 if report["in_sync"] else 1


if __name__ == "__main__":
    sys.exit(main())
