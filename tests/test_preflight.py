"""Pre-flight: a version is loaded as a cold start loads it and must answer its reference rides as training
recorded; a version that does not is blocked, tagged with the reason, and the alias goes back to the one serving."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from rollout import preflight
from rollout.app import RegistryStory
from rollout.reconcile import Deployment, Rollout
from training import registry


def _model_folder(local_model) -> Path:
    from mlflow import MlflowClient

    result, settings = local_model
    logged = MlflowClient(settings.tracking_uri).get_logged_model(result.model_uri.rpartition("/")[2])
    return Path(logged.artifact_location.removeprefix("file://"))


def test_a_logged_model_passes_its_preflight_through_the_functions_loader(local_model):
    result, _ = local_model
    verdict = preflight.run(str(_model_folder(local_model)), result.run_id)  # in a process of its own, as a cold start
    assert verdict.passed, verdict
    assert verdict.rides == 200 and verdict.max_diff_minutes <= preflight.TOLERANCE_MINUTES and verdict.out_of_bounds == 0
    assert not preflight.run(str(_model_folder(local_model)), "another-run").passed


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("answers", "up to 1.000 min away"),  # its scorer no longer answers what training recorded
        ("range", "up to 2.000 min away"),  # nor gives the range training recorded
        ("serving_form", "does not load as the function loads it"),
        ("reference", "cannot answer its reference rides"),
    ],
)
def test_a_version_that_does_not_answer_as_recorded_fails_its_preflight(local_model, tmp_path, tamper, reason):
    result, _ = local_model
    broken = tmp_path / "model"
    shutil.copytree(_model_folder(local_model), broken)
    reference_path = broken / "extra_files" / "reference_rides.json"
    reference = json.loads(reference_path.read_text())
    if tamper == "answers":
        reference["served_minutes"][0] += 1.0
    elif tamper == "range":
        reference["served_high"][3] += 2.0
    elif tamper == "reference":
        reference["rides"][0]["PULocationID"] = 999
    else:
        (broken / "extra_files" / "serving_form.npz").write_bytes(b"not a serving form")
    reference_path.write_text(json.dumps(reference))
    # In this process (the copies ship the same contract as this checkout): what run() does in its own.
    verdict = preflight.check(str(broken), result.run_id)
    assert not verdict.passed and reason in verdict.reason, verdict


class FakeTarget:
    name = "fake function"

    def __init__(self, serving: Deployment):
        self.current = serving
        self.deployed: list[str] = []

    def serving(self):
        return self.current

    def deploy(self, model):
        self.deployed.append(model.version)
        self.current = model


def _promoted_over(local_model, monkeypatch, model_name: str):
    """Two versions of the test model under ``model_name``; production moved to the second, as in the UI."""
    result, shared = local_model
    settings = replace(shared, model_name=model_name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    first = registry.register(result.model_uri, result.run_id, settings).version
    second = registry.register(result.model_uri, result.run_id, settings).version
    registry.promote(second, settings)
    return result, settings, first, second


def test_a_blocked_version_is_tagged_with_its_reason_and_the_alias_returns_to_the_serving_one(local_model, monkeypatch):
    result, settings, good, bad = _promoted_over(local_model, monkeypatch, "ride-duration-preflight")
    serving = Deployment(str(good), result.run_id, str(_model_folder(local_model)))
    target = FakeTarget(serving)

    def resolve(alias):
        model = registry.resolve(alias, settings)
        return Deployment(model.version, model.run_id, model.artifact_uri)

    def refuse(model):
        return preflight.Preflight(False, "answers its 200 reference rides up to 4.200 min away", 200, 4.2)

    rollout = Rollout("production", resolve, target, preflight=refuse, story=RegistryStory(settings.model_name))
    message = rollout.reconcile()
    assert "blocked at pre-flight" in message and target.deployed == []  # riders never got it
    from mlflow import MlflowClient

    version = MlflowClient(settings.tracking_uri).get_model_version(settings.model_name, str(bad))
    assert version.tags["rollout_status"] == "blocked" and "4.200 min" in version.tags["rollout_reason"]
    assert "blocked at pre-flight" in version.description and f"Riders stayed on v{good}" in version.description
    assert registry.current_version(registry.PRODUCTION, settings) == str(good)  # the registry tells the truth again
    assert rollout.reconcile() == f"already serving v{good}"
    assert rollout.status()["in_sync"] is True


def test_a_version_that_passes_is_rolled_out_and_its_page_says_so(local_model, monkeypatch):
    result, settings, first, second = _promoted_over(local_model, monkeypatch, "ride-duration-preflight-ok")
    target = FakeTarget(Deployment(str(first), result.run_id))

    def resolve(alias):
        model = registry.resolve(alias, settings)
        return Deployment(model.version, model.run_id, str(_model_folder(local_model)))

    rollout = Rollout("production", resolve, target, preflight=preflight_of_folder, story=RegistryStory(settings.model_name))
    assert "serving after" in rollout.reconcile() and target.deployed == [str(second)]
    from mlflow import MlflowClient

    version = MlflowClient(settings.tracking_uri).get_model_version(settings.model_name, str(second))
    assert version.tags["rollout_status"] == "serving production"
    assert "Pre-flight passed" in version.description and f"replacing v{first}" in version.description


def preflight_of_folder(model: Deployment):
    return preflight.run(model.artifact_uri, model.run_id)
