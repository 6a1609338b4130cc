"""The model registry: register, promote by alias, resolve an alias to what serving needs.

    python -m training.registry promote --version 3          # alias "production" -> v3
    python -m training.registry rollback                     # alias "production" -> the version alias "previous" names
    python -m training.registry resolve --alias production   # JSON: version, run_id, artifact_uri

Stages are deprecated in MLflow; aliases are used instead: ``production`` is
what the serving function runs, ``challenger`` a registered model that did not
(yet) beat it, ``previous`` the version production pointed at before the last
promotion (for a one-command rollback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

from training.settings import Settings

PRODUCTION = "production"
CHALLENGER = "challenger"
PREVIOUS = "previous"


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    alias: str
    version: str
    run_id: str
    model_uri: str  # models:/name@alias
    artifact_uri: str  # where the model files are, e.g. gs://bucket/1/models/m-.../artifacts


def _client(settings: Settings):
    """A client of the tracking store. The registry needs no experiment: none is set or created here
    (under `mlflow run`, registering must not add an experiment beside the run's)."""
    import mlflow
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(settings.tracking_uri)
    return MlflowClient(settings.tracking_uri)


def register(model_uri: str, run_id: str, settings: Settings | None = None, wait_seconds: float = 120):
    """Register a logged model as a new version of the project's model."""
    import mlflow

    settings = settings or Settings.from_env()
    client = _client(settings)
    version = mlflow.register_model(model_uri, settings.model_name, tags={"run_id": run_id})
    deadline = time.monotonic() + wait_seconds
    while version.status != "READY" and time.monotonic() < deadline:
        time.sleep(0.5)
        version = client.get_model_version(settings.model_name, version.version)
    return version


def set_alias(version: str, alias: str, settings: Settings | None = None) -> None:
    settings = settings or Settings.from_env()
    _client(settings).set_registered_model_alias(settings.model_name, alias, str(version))


def current_version(alias: str, settings: Settings | None = None) -> str | None:
    from mlflow.exceptions import MlflowException

    settings = settings or Settings.from_env()
    try:
        return str(_client(settings).get_model_version_by_alias(settings.model_name, alias).version)
    except MlflowException:
        return None


def promote(version: str, settings: Settings | None = None) -> str | None:
    """Point ``production`` at ``version``; the old production becomes ``previous``. Returns the old one."""
    settings = settings or Settings.from_env()
    client = _client(settings)
    client.get_model_version(settings.model_name, str(version))  # fails clearly on an unknown version
    old = current_version(PRODUCTION, settings)
    if old is not None and old != str(version):
        client.set_registered_model_alias(settings.model_name, PREVIOUS, old)
    client.set_registered_model_alias(settings.model_name, PRODUCTION, str(version))
    challenger = current_version(CHALLENGER, settings)
    if challenger == str(version):
        client.delete_registered_model_alias(settings.model_name, CHALLENGER)
    return old


def describe(version: str, description: str, tags: dict[str, str], settings: Settings | None = None) -> None:
    """The version's description and tags, as the MLflow UI shows them on its version page and table."""
    settings = settings or Settings.from_env()
    client = _client(settings)
    client.update_model_version(settings.model_name, str(version), description=description)
    for key, value in tags.items():
        client.set_model_version_tag(settings.model_name, str(version), key, value)


def rollback(settings: Settings | None = None) -> str:
    """Point ``production`` back at ``previous`` (and ``previous`` at what production was). Returns the version now serving."""
    settings = settings or Settings.from_env()
    target = current_version(PREVIOUS, settings)
    if target is None:
        raise LookupError(f"model {settings.model_name} has no alias {PREVIOUS!r}: nothing to roll back to")
    promote(target, settings)
    return target


def load_registered_model(model_uri: str):
    """A model of our own registry as its sklearn pipeline (``models:/name@alias``, ``models:/m-id``, a path).

    The pickle is ours, so loading it is an explicit opt-in MLflow asks for."""
    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    return mlflow.sklearn.load_model(model_uri)


def resolve(alias: str = PRODUCTION, settings: Settings | None = None) -> ResolvedModel:
    """An alias as the RUN_ID and bucket location the serving function loads from."""
    settings = settings or Settings.from_env()
    client = _client(settings)
    version = client.get_model_version_by_alias(settings.model_name, alias)
    # MLflow 3 keeps logged models outside the run's artifacts, at <root>/<exp>/models/m-<id>/artifacts;
    # the version's source is models:/m-<id>, which only a tracking server can resolve.
    model_id = getattr(version, "model_id", None) or version.source.rpartition("/")[2]
    artifact_uri = client.get_logged_model(model_id).artifact_location if model_id.startswith("m-") else version.source
    return ResolvedModel(
        settings.model_name, alias, str(version.version), version.run_id, f"models:/{settings.model_name}@{alias}", artifact_uri
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    promote_cmd = sub.add_parser("promote", help="set alias production to a version")
    promote_cmd.add_argument("--version", required=True)
    sub.add_parser("rollback", help="set alias production back to the version alias previous names")
    resolve_cmd = sub.add_parser("resolve", help="print an alias's version, RUN_ID and artifact URI as JSON")
    resolve_cmd.add_argument("--alias", default=PRODUCTION)
    resolve_cmd.add_argument("--field", choices=[f for f in ResolvedModel.__dataclass_fields__], help="print one field only")
    args = parser.parse_args(argv)

    from mlflow.exceptions import MlflowException

    try:
        if args.command == "promote":
            old = promote(args.version)
            print(f"production: version {args.version} (was {old or 'unset'})")
        elif args.command == "rollback":
            print(f"production: version {rollback()} (rolled back)")
        else:
            resolved = resolve(args.alias)
            print(getattr(resolved, args.field) if args.field else json.dumps(asdict(resolved), indent=2))
    except MlflowException as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except LookupError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
