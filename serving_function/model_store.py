"""Find and load an MLflow-logged model's serving form straight from the artifact bucket, without MLflow.

Importing MLflow, scikit-learn or pandas costs seconds at every cold start; the
serving function needs only three things from the model folder: the ``MLmodel``
file, the ride contract the model ships (``code/ride_contract``) and the serving
form training wrote beside the pipeline (``extra_files/serving_form.npz``, plain
arrays), with the rider's range where the model has one (``extra_files/interval.json``
and its two serving forms). Nothing else is downloaded (the pickled pipeline stays in the bucket),
and nothing is unpickled.

MLflow 3 stores a logged model at ``<artifact root>/<experiment>/models/m-<model id>/artifacts``
and records the run that logged it in the ``MLmodel`` file, so a RUN_ID is enough to find it.
The contract is put on ``sys.path``: serving validates, featurizes, scores and answers with
exactly the code the model was trained with.
"""

from __future__ import annotations

import importlib
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

_MLMODEL_IN_BUCKET = re.compile(r"(^|/)models/m-[0-9a-f]+/artifacts/MLmodel$")


# What the function uses of the model's ride contract: the schema, the features, the scorer, the result message.
CONTRACT_MODULES = ("ride", "features", "serving_form", "result")
# ride_contract.serving_form.FILE_NAME: the file is found before the model's own contract is imported.
SERVING_FORM_FILE = "serving_form.npz"
# ride_contract.serving_form's INTERVAL_FILE, LOW_FORM_FILE and HIGH_FORM_FILE, for the same reason.
INTERVAL_FILE = "interval.json"
RANGE_FILES = (INTERVAL_FILE, "serving_form_low.npz", "serving_form_high.npz")


# Every storage call at cold start gives up within this, retries included.
STORAGE_DEADLINE_SECONDS = 10.0
STORAGE_CALL_TIMEOUT_SECONDS = 5.0


class ModelNotFound(RuntimeError):
    """The configured RUN_ID / MODEL_URI does not lead to a loadable model."""


class ModelStoreUnavailable(RuntimeError):
    """The bucket could not be read in time: the instance fails to start, saying where it looked."""


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # the model's serving form (contract.serving_form.ServingForm): rides in, minutes out
    contract: ModuleType  # the model's own ride_contract package, its CONTRACT_MODULES loaded
    run_id: str
    model_id: str
    uri: str
    # Its range (contract.serving_form.Interval): rides in, (low, high) minutes out. None for a model
    # logged without one: it answers without a range.
    interval: Any = None


def _mlmodel(text: str, uri: str) -> dict[str, Any]:
    """The MLmodel file, parsed as the YAML it is (the sklearn flavor's fields are nested)."""
    import yaml

    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelNotFound(f"the MLmodel file at {uri} is not valid YAML: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ModelNotFound(f"the MLmodel file at {uri} is not an MLflow model description")
    return parsed


def _storage_client():
    from google.cloud import storage

    return storage.Client()


# A copy of data.gcs.split_gs_uri on purpose: the function's upload folder is self-contained.
def _split_gs(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("gs://") :].partition("/")
    return bucket, key.strip("/")


@contextmanager
def _reading(location: str):
    """Storage errors as one clear line naming what was being read (the client's would name a URL)."""
    from google.api_core import exceptions

    try:
        yield
    except (exceptions.GoogleAPIError, OSError) as exc:  # RetryError once the deadline passed, or a refused connection
        raise ModelStoreUnavailable(
            f"cannot read the model at {location} within {STORAGE_DEADLINE_SECONDS:g} s: {type(exc).__name__}"
        ) from exc


def _bounded() -> dict[str, Any]:
    """Retries that give up within the deadline: a cold start that cannot reach the bucket fails in seconds."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    retry = DEFAULT_RETRY.with_delay(initial=0.2, maximum=2.0).with_timeout(STORAGE_DEADLINE_SECONDS)
    return {"retry": retry, "timeout": STORAGE_CALL_TIMEOUT_SECONDS}


def find_model_uri(bucket: str, run_id: str, prefix: str = "") -> str:
    """The ``gs://`` folder of the model logged by ``run_id`` under ``bucket/prefix``."""
    client = _storage_client()
    searched = f"gs://{bucket}/{prefix}".rstrip("/")
    found = []
    # A folder, not a string prefix: "mlflow/1" must not reach into "mlflow/10".
    folder = f"{prefix.strip('/')}/" if prefix.strip("/") else None
    with _reading(f"{searched} (RUN_ID {run_id})"):
        for blob in client.list_blobs(bucket, prefix=folder, match_glob="**/models/m-*/artifacts/MLmodel", **_bounded()):
            if not _MLMODEL_IN_BUCKET.search(blob.name):
                continue
            if _mlmodel(blob.download_as_text(**_bounded()), f"gs://{bucket}/{blob.name}").get("run_id") == run_id:
                found.append(blob.name.rpartition("/")[0])
    if not found:
        raise ModelNotFound(f"no model logged by run {run_id} under {searched}/**/models/m-*/artifacts")
    if len(found) > 1:
        raise ModelNotFound(f"run {run_id} logged {len(found)} models under {searched}; set MODEL_URI to one of: {found}")
    return f"gs://{bucket}/{found[0]}"


def read_model_file(uri: str, relative: str) -> bytes:
    """One file of the model folder at ``uri`` (``gs://`` or local), with the cold start's bounded retries."""
    if not uri.startswith("gs://"):
        path = Path(uri.removeprefix("file://")) / relative
        if not path.is_file():
            raise ModelNotFound(f"no {relative} in the model at {uri}")
        return path.read_bytes()
    bucket_name, prefix = _split_gs(uri)
    with _reading(f"{uri}/{relative}"):
        blob = _storage_client().bucket(bucket_name).blob(f"{prefix}/{relative}")
        if not blob.exists(**_bounded()):
            raise ModelNotFound(f"no {relative} in the model at {uri}")
        return blob.download_as_bytes(**_bounded())


def _served_file(relative: str) -> bool:
    """The files the function reads; the pickled pipeline, input example and environment files stay behind."""
    name = relative.rpartition("/")[2]
    return relative == "MLmodel" or relative.startswith("code/") or name == SERVING_FORM_FILE or name in RANGE_FILES


def _download_folder(uri: str, dest: Path) -> None:
    bucket_name, prefix = _split_gs(uri)
    client = _storage_client()
    with _reading(uri):
        blobs = list(client.list_blobs(bucket_name, prefix=prefix + "/", **_bounded()))
        if not blobs:
            raise ModelNotFound(f"nothing at {uri}")
        for blob in blobs:
            relative = blob.name[len(prefix) + 1 :]
            if not _served_file(relative):
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(target), **_bounded())


def load_model(uri: str, cache_dir: Path | None = None) -> LoadedModel:
    """Load the serving form of the model at ``uri``: a ``gs://`` folder or a local folder with an MLmodel file.

    A ``gs://`` model is downloaded into a temporary folder that is removed once it is loaded,
    or once loading failed: on Cloud Functions ``/tmp`` is the instance's memory, and an
    instance that failed to start must not leave its download behind for the next one."""
    if not uri.startswith("gs://"):
        return _load_folder(Path(uri.removeprefix("file://")), uri)
    with tempfile.TemporaryDirectory(prefix="model-", dir=cache_dir) as tmp:
        _download_folder(uri, Path(tmp))
        code_dir = str(Path(tmp) / "code")
        try:
            return _load_folder(Path(tmp), uri)  # the arrays and the contract's modules are in memory now
        finally:
            if code_dir in sys.path:
                sys.path.remove(code_dir)


def _load_folder(local: Path, uri: str) -> LoadedModel:
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        raise ModelNotFound(f"no MLmodel file at {uri}")
    description = _mlmodel(mlmodel.read_text(), uri)
    sklearn_flavor = (description.get("flavors") or {}).get("sklearn")
    if not isinstance(sklearn_flavor, dict):
        flavors = ", ".join(description.get("flavors") or {}) or "none"
        raise ModelNotFound(f"the model at {uri} is not an sklearn model (flavors: {flavors})")

    code_dir = local / "code"
    if not (code_dir / "ride_contract").is_dir():
        raise ModelNotFound(
            f"the model at {uri} does not ship the ride contract (code/ride_contract): it was logged before "
            "ride_contract existed; retrain and promote a new version"
        )
    form_path = _serving_form_path(local, sklearn_flavor, uri)
    if str(code_dir) not in sys.path:
        sys.path.insert(0, str(code_dir))
    contract = importlib.import_module("ride_contract")
    for module in CONTRACT_MODULES:
        importlib.import_module(f"ride_contract.{module}")
    if not hasattr(contract.result, "served_minutes"):
        raise ModelNotFound(
            f"the model at {uri} ships a ride contract without duration bounds (ride_contract.result.served_minutes): "
            "it could answer riders with any number of minutes; retrain and promote a new version"
        )
    try:
        form = contract.serving_form.ServingForm.load(form_path)
        # A range the model lists but that does not load fails the start, as a broken form does.
        interval = contract.serving_form.Interval.load(form_path.with_name(INTERVAL_FILE)) if _has_range(sklearn_flavor) else None
    except contract.serving_form.ServingFormError as exc:
        raise ModelNotFound(f"the model at {uri} has a serving form this function cannot score: {exc}") from exc
    run_id, model_id = str(description.get("run_id", "")), str(description.get("model_id", ""))
    return LoadedModel(form, contract, run_id, model_id, uri, interval)


def _has_range(flavor: dict[str, Any]) -> bool:
    """Whether the sklearn flavor lists the range's files among its extra files (models since issue 21 do)."""
    listed = {entry.get("path", "").rpartition("/")[2] for entry in flavor.get("extra_files") or [] if isinstance(entry, dict)}
    return set(RANGE_FILES) <= listed


def _serving_form_path(local: Path, flavor: dict[str, Any], uri: str) -> Path:
    """The serving form the sklearn flavor lists among its extra files."""
    listed = [entry.get("path", "") for entry in flavor.get("extra_files") or [] if isinstance(entry, dict)]
    forms = [path for path in listed if path.rpartition("/")[2] == SERVING_FORM_FILE]
    if not forms:
        raise ModelNotFound(
            f"the model at {uri} has no serving form ({SERVING_FORM_FILE} among the sklearn flavor's extra_files): "
            "it was logged before serving forms existed, and this function does not run scikit-learn; "
            "retrain and promote a new version"
        )
    path = local / forms[0]
    if not path.is_file():
        raise ModelNotFound(f"the model at {uri} lists {forms[0]} as its serving form, but there is no such file")
    return path
