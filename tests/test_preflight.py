"""Pre-flight: a version is loaded as a cold start loads it and must answer its reference rides as training
recorded; a version that does not is blocked, tagged with the reason, and the alias goes back to the one serving."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
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
    assert verdict.passed and verdict.evaluated, verdict
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
    assert not verdict.passed and verdict.evaluated and reason in verdict.reason, verdict


def _retrained_in_seconds(local_model, tmp_path, scale: float) -> Path:
    """A copy of the real model whose forest answers ``scale`` times its minutes (trained on durations in
    seconds, say), with the reference rides it would have recorded: its answers as served, clipped to 60."""
    from serving_function.model_store import load_model

    folder = tmp_path / "model"
    shutil.copytree(_model_folder(local_model), folder)
    form_path = folder / "extra_files" / "serving_form.npz"
    arrays = dict(np.load(form_path, allow_pickle=False))
    arrays["baseline"], arrays["node_value"] = arrays["baseline"] * scale, arrays["node_value"] * scale
    np.savez(form_path, **arrays)
    loaded = load_model(str(folder))
    reference_path = folder / "extra_files" / "reference_rides.json"
    reference = json.loads(reference_path.read_text())
    rides = [loaded.contract.ride.parse_ride(ride) for ride in reference["rides"]]
    predicted = loaded.model.predict(rides)
    reference["served_minutes"] = loaded.contract.result.served_minutes(predicted).tolist()
    if loaded.interval is not None:
        low, high = loaded.contract.result.served_range(predicted, *loaded.interval.predict(rides))
        reference["served_low"], reference["served_high"] = low.tolist(), high.tolist()
    reference_path.write_text(json.dumps(reference))
    return folder


def test_a_model_answering_hours_fails_its_preflight_though_its_served_answers_match(local_model, tmp_path):
    """Served answers are clipped into 1-60 min, so a model answering ~10 hours per ride answers its reference
    rides "as recorded" (60 min each): pre-flight judges what it really answers, before the clip."""
    result, _ = local_model
    verdict = preflight.check(str(_retrained_in_seconds(local_model, tmp_path, 60.0)), result.run_id)
    assert not verdict.passed and verdict.evaluated, verdict
    assert verdict.max_diff_minutes <= preflight.TOLERANCE_MINUTES  # it does answer as recorded, once clipped
    assert verdict.out_of_bounds == verdict.rides == 200 and "before clipping, 200 answers outside 1-60 min" in verdict.reason


def test_a_model_answering_not_a_number_fails_its_preflight(local_model, tmp_path):
    result, _ = local_model
    verdict = preflight.check(str(_retrained_in_seconds(local_model, tmp_path, float("nan"))), result.run_id)
    assert not verdict.passed and verdict.evaluated and "200 not a number" in verdict.reason, verdict
    assert preflight.Preflight(**json.loads(json.dumps(asdict(verdict)))) == verdict  # it crosses run()'s pipe as JSON


def test_a_storage_error_during_preflight_is_not_evaluated_and_an_absent_model_is_evaluated(monkeypatch, tmp_path):
    """An unreachable store says nothing of the version (retry); a folder with no model in it fails it."""
    from devstack.processes import free_port
    from serving_function import model_store

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "preflight-test")
    monkeypatch.setattr(model_store, "STORAGE_DEADLINE_SECONDS", 1.0)  # its retries give up within a second
    unreachable = preflight.check("gs://models/mlflow/1/models/m-1/artifacts")
    assert not unreachable.passed and not unreachable.evaluated and "could not read the model" in unreachable.reason
    absent = preflight.check(str(tmp_path / "no-model-here"))
    assert not absent.passed and absent.evaluated and "does not load" in absent.reason, absent


def test_a_preflight_that_times_out_is_not_evaluated(local_model, monkeypatch):
    monkeypatch.setattr(preflight, "PREFLIGHT_TIMEOUT_SECONDS", 0.01)
    verdict = preflight.run(str(_model_folder(local_model)))
    assert not verdict.passed and not verdict.evaluated and "did not load and answer within" in verdict.reason


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
