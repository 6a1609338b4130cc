"""Unit tests of the serving function's handler and model loading: fake model, recording publisher."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from conftest import REPO

import ride_contract
import ride_contract.features
import ride_contract.result
import ride_contract.ride
from ride_contract.result import RideResult
from ride_contract.ride import RIDE_COLUMNS, Ride
from serving_function import prediction
from serving_function.model_store import ModelNotFound, load_model
from serving_function.prediction import RideDurationService

RIDE = {"ride_id": "r-1", "datetime": "2022-06-23 11:36:42", "PULocationID": 34, "DOLocationID": 56, "trip_distance": 12}


def b64(payload) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return base64.b64encode(text.encode()).decode()


class FakeModel:
    """Predicts 2 minutes per mile, and records what it was asked."""

    def __init__(self):
        self.frames = []

    def predict(self, frame):
        self.frames.append(frame)
        return frame["trip_distance"].to_numpy() * 2.0


class RecordingPublisher:
    def __init__(self, fail: bool = False):
        self.sent: list[tuple[str, dict, dict]] = []
        self.fail = fail

    def publish(self, topic: str, data: bytes, **attributes: str) -> None:
        if self.fail:
            raise TimeoutError("publish timed out")
        self.sent.append((topic, json.loads(data), attributes))


def service(publisher=None, model=None) -> RideDurationService:
    return RideDurationService(
        model or FakeModel(), ride_contract, publisher or RecordingPublisher(), "results", "dead", "run-1", "7"
    )


def test_valid_ride_is_predicted_and_published_with_model_identity():
    publisher = RecordingPublisher()
    result = service(publisher).handle(b64(RIDE), message_id="m1")
    fingerprint = Ride.model_validate(RIDE).fingerprint()
    assert result == RideResult(
        ride_id="r-1", duration_final=24.0, model_run_id="run-1", model_version="7", ride_fingerprint=fingerprint
    )
    assert publisher.sent == [
        (
            "results",
            {
                "ride_id": "r-1",
                "duration_final": 24.0,
                "model_run_id": "run-1",
                "model_version": "7",
                "model_id": "",
                "ride_fingerprint": fingerprint,
            },
            {"ride_id": "r-1"},
        )
    ]


def test_model_gets_raw_ride_columns_only():
    model = FakeModel()
    service(model=model).handle(b64(RIDE), message_id="m1")
    assert list(model.frames[0].columns) == RIDE_COLUMNS


def test_missing_ride_id_is_derived_from_message_id_so_redelivery_keeps_it():
    publisher = RecordingPublisher()
    ride = {k: v for k, v in RIDE.items() if k != "ride_id"}
    svc = service(publisher)
    first = svc.handle(b64(ride), message_id="12345")
    again = svc.handle(b64(ride), message_id="12345")
    assert first.ride_id == again.ride_id == "msg-12345"
    assert [record["ride_id"] for _, record, _ in publisher.sent] == ["msg-12345", "msg-12345"]


def test_a_repeated_ride_is_not_predicted_again_but_its_result_is_published_again():
    publisher, model = RecordingPublisher(), FakeModel()
    svc = service(publisher, model)
    assert svc.handle(b64(RIDE), "m1") == svc.handle(b64(RIDE), "m2")  # e.g. resent by the backend
    assert len(model.frames) == 1
    assert len(publisher.sent) == 2 and publisher.sent[0] == publisher.sent[1]  # one logical result


def test_a_reused_ride_id_with_another_ride_is_predicted_afresh():
    publisher, model = RecordingPublisher(), FakeModel()
    svc = service(publisher, model)
    first = svc.handle(b64(RIDE), "m1")
    other = svc.handle(b64({**RIDE, "trip_distance": 30}), "m2")  # same ride_id, a 30-mile ride
    assert (first.duration_final, other.duration_final) == (24.0, 60.0)
    assert first.ride_fingerprint != other.ride_fingerprint
    assert len(model.frames) == 2


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("%%% not base64 %%%", "not base64"),
        (b64("{not json"), "not JSON"),
        (b64("[1, 2]"), "must be a JSON object"),
        (b64({**RIDE, "PULocationID": 999}), "PULocationID"),
        (b64({**RIDE, "trip_distance": -1}), "trip_distance"),
        (b64({**RIDE, "datetime": "yesterday"}), "datetime"),
        (b64({**RIDE, "fare": 10}), "fare"),
        ("", "empty"),
        (None, "empty"),
    ],
)
def test_poison_message_goes_to_dead_letter_with_reason_and_original_data(data, reason):
    publisher = RecordingPublisher()
    assert service(publisher).handle(data, message_id="m9") is None
    [(topic, record, attributes)] = publisher.sent
    assert topic == "dead"
    assert reason in record["reason"] and reason in attributes["reason"]
    assert record["data"] == (data or "") and record["message_id"] == "m9"


def test_publish_failure_raises_so_pubsub_redelivers_and_is_not_remembered():
    svc = service(RecordingPublisher(fail=True))
    with pytest.raises(TimeoutError):
        svc.handle(b64(RIDE), "m1")
    svc.publisher = RecordingPublisher()
    svc.handle(b64(RIDE), "m1")  # the redelivery is answered, not taken for a duplicate
    assert len(svc.publisher.sent) == 1


def test_answered_rides_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(prediction, "RECENT_RIDES", 3)
    svc = service()
    for i in range(10):
        svc.handle(b64({**RIDE, "ride_id": f"r{i}"}), f"m{i}")
    assert [ride_id for ride_id, _ in svc._answered] == ["r7", "r8", "r9"]


def test_load_model_from_logged_folder_predicts_like_the_pipeline(local_model):
    from training.registry import promote, resolve

    result, settings = local_model
    promote(result.version, settings)
    resolved = resolve("production", settings)
    loaded = load_model(resolved.artifact_uri)
    assert loaded.run_id == result.run_id and loaded.model_id.startswith("m-")
    assert loaded.contract.__name__ == "ride_contract"
    rides = [Ride.model_validate(RIDE), Ride.model_validate({**RIDE, "trip_distance": 1.5})]
    minutes = loaded.model.predict(loaded.contract.features.rides_frame(rides))
    assert minutes.shape == (2,) and np.all((minutes > 1) & (minutes < 60)) and minutes[0] > minutes[1]


def test_load_model_names_the_uri_it_tried(tmp_path):
    with pytest.raises(ModelNotFound, match=re.escape(str(tmp_path))):
        load_model(str(tmp_path))


def test_a_model_logged_before_the_ride_contract_is_refused_with_the_reason(tmp_path):
    # Versions registered before ride_contract existed ship code/training instead.
    (tmp_path / "MLmodel").write_text("run_id: old-run\nflavors:\n  sklearn:\n    pickled_model: model.pkl\n")
    (tmp_path / "code" / "training").mkdir(parents=True)
    with pytest.raises(ModelNotFound, match=r"does not ship the ride contract .*retrain"):
        load_model(str(tmp_path))


def test_concurrent_rides_are_predicted_together_and_each_gets_its_own_answer():
    import threading

    class SlowModel(FakeModel):
        def predict(self, frame):
            threading.Event().wait(0.05)  # rides arriving meanwhile queue up for the next batch
            return super().predict(frame)

    model, publisher = SlowModel(), RecordingPublisher()
    svc = service(publisher, model)
    threads = [
        threading.Thread(target=svc.handle, args=(b64({**RIDE, "ride_id": f"r{i}", "trip_distance": i + 1}), f"m{i}"))
        for i in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {record["ride_id"]: record["duration_final"] for _, record, _ in publisher.sent} == {
        f"r{i}": 2.0 * (i + 1) for i in range(20)
    }
    assert len(model.frames) < 20 and max(len(f) for f in model.frames) > 1


def test_a_failing_model_fails_the_request_so_it_is_redelivered():
    class BrokenModel:
        def predict(self, frame):
            raise MemoryError("out of memory")

    publisher = RecordingPublisher()
    with pytest.raises(MemoryError):
        service(publisher, BrokenModel()).handle(b64(RIDE), "m1")
    assert publisher.sent == []


def test_a_cold_start_that_cannot_reach_the_bucket_fails_within_its_deadline_naming_the_model(monkeypatch):
    import socket

    from serving_function import model_store

    with socket.socket() as sock:  # a storage address nothing answers at
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{sock.getsockname()[1]}")
    monkeypatch.setattr(model_store, "STORAGE_DEADLINE_SECONDS", 2.0)  # the client's default retry took 110 s
    with pytest.raises(model_store.ModelStoreUnavailable, match=r"gs://ridestream-models/mlflow \(RUN_ID abc\) within 2 s"):
        model_store.find_model_uri("ridestream-models", "abc", "mlflow")
    with pytest.raises(model_store.ModelStoreUnavailable, match=r"gs://ridestream-models/mlflow/1/models/m-1/artifacts"):
        model_store.load_model("gs://ridestream-models/mlflow/1/models/m-1/artifacts")


def test_log_lines_stay_whole_under_concurrency(monkeypatch):
    import io
    import threading
    import time

    class SwitchingStream(io.StringIO):
        """Hands the GIL to another thread on every write, as a busy process does."""

        def write(self, text):
            time.sleep(0)
            return super().write(text)

    out = SwitchingStream()
    monkeypatch.setattr(prediction.sys, "stdout", out)
    writers = [
        threading.Thread(target=lambda i=i: [prediction.log("INFO", "prediction", ride_id=f"r{i}-{n}") for n in range(100)])
        for i in range(16)
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1600 and all(json.loads(line)["message"] == "prediction" for line in lines)


def test_a_paused_process_does_not_use_up_the_predict_timeout():
    import itertools
    import threading
    from concurrent.futures import Future

    # Every wait slice appears to take 40 s of clock time, as when the process is paused meanwhile.
    paused_clock = itertools.count(0, 40).__next__
    answer: Future = Future()
    threading.Timer(0.3, answer.set_result, args=[12.5]).start()
    assert prediction.wait_awake(answer, budget_seconds=30, step=0.05, clock=paused_clock) == 12.5

    never: Future = Future()
    with pytest.raises(TimeoutError):  # awake time still runs out
        prediction.wait_awake(never, budget_seconds=0.2, step=0.05)


def _model_folder(tmp_path, flavors: dict, files: dict[str, bytes]):
    """A logged-model folder as MLflow writes it: MLmodel (YAML), code/ride_contract, the pickle."""
    import shutil

    import yaml

    (tmp_path / "MLmodel").write_text(yaml.safe_dump({"run_id": "run-7", "model_id": "m-7", "flavors": flavors}))
    shutil.copytree(REPO / "ride_contract", tmp_path / "code" / "ride_contract")
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return str(tmp_path)


@pytest.mark.parametrize("serialization", ["cloudpickle", "pickle"])
def test_the_sklearn_flavor_names_the_pickle_file_and_its_format(tmp_path, serialization):
    import pickle

    import cloudpickle

    dump = cloudpickle.dumps if serialization == "cloudpickle" else pickle.dumps
    flavor = {"sklearn": {"pickled_model": "pipeline.bin", "serialization_format": serialization}}
    loaded = load_model(_model_folder(tmp_path, flavor, {"pipeline.bin": dump({"fitted": serialization})}))
    assert loaded.model == {"fitted": serialization}
    assert (loaded.run_id, loaded.model_id) == ("run-7", "m-7")


@pytest.mark.parametrize(
    ("flavors", "files", "message"),
    [
        (
            {"sklearn": {"pickled_model": "model.skops", "serialization_format": "skops"}},
            {"model.skops": b"x"},
            "serialized with skops",
        ),
        ({"python_function": {"loader_module": "mlflow.pyfunc.model"}}, {}, r"not an sklearn model \(flavors: python_function\)"),
        ({"sklearn": {"pickled_model": "gone.pkl"}}, {}, "no such file"),
        (
            {"sklearn": {"pickled_model": "model.pkl", "serialization_format": "joblib"}},
            {"model.pkl": b"x"},
            "unknown serialization_format",
        ),
    ],
)
def test_a_model_the_function_cannot_load_is_refused_saying_why(tmp_path, flavors, files, message):
    with pytest.raises(ModelNotFound, match=message):
        load_model(_model_folder(tmp_path, flavors, files))
