"""Unit tests of the serving function's handler and model loading: fake model, recording publisher."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

import ride_contract
import ride_contract.features
import ride_contract.result
import ride_contract.ride
from ride_contract.result import RideResult
from ride_contract.ride import Ride
from ride_contract.sklearn_features import rides_frame
from serving_function import prediction
from serving_function.model_store import ModelNotFound, load_model
from serving_function.prediction import RideDurationService

RIDE = {"ride_id": "r-1", "datetime": "2022-06-23 11:36:42", "PULocationID": 34, "DOLocationID": 56, "trip_distance": 12}


def b64(payload) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return base64.b64encode(text.encode()).decode()


class FakeModel:
    """Predicts 2 minutes per mile, and records the rides it was asked about."""

    kind = "fake"

    def __init__(self):
        self.calls: list[list[Ride]] = []

    def predict(self, rides):
        self.calls.append(list(rides))
        return np.array([ride.trip_distance * 2.0 for ride in rides])


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
        model or FakeModel(),
        ride_contract,
        publisher or RecordingPublisher(),
        "results",
        "dead",
        "run-1",
        "7",
        deployment="function-prod",
    )


class ConstantModel:
    """Answers every ride with the same raw number of minutes."""

    kind = "fake"

    def __init__(self, minutes: float):
        self.minutes = minutes

    def predict(self, rides):
        return np.full(len(rides), self.minutes)


@pytest.mark.parametrize(("raw", "served"), [(-2.38, 1.0), (0.2, 1.0), (75.04, 60.0), (1.0, 1.0), (60.0, 60.0), (13.456, 13.46)])
def test_answers_outside_the_duration_bounds_are_clipped_marked_counted_and_logged(raw, served, capsys):
    publisher = RecordingPublisher()
    svc = service(publisher, ConstantModel(raw))
    result = svc.handle(b64(RIDE), "m1")
    clipped = not 1.0 <= raw <= 60.0
    assert result.duration_final == served and result.clipped is clipped
    assert publisher.sent[0][1]["duration_final"] == served and publisher.sent[0][1]["clipped"] is clipped
    assert svc.clipped == int(clipped)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    clip_lines = [line for line in lines if line["message"] == "prediction clipped"]
    assert [line["predicted_minutes"] for line in clip_lines] == ([raw] if clipped else [])


def test_the_result_message_refuses_durations_outside_the_bounds_and_results_naming_no_ride():
    from pydantic import ValidationError

    fields = {"ride_id": "r", "model_run_id": "run", "ride_fingerprint": "abc"}
    for minutes in (-2.38, 0.99, 60.01, float("nan")):
        with pytest.raises(ValidationError):
            RideResult(**fields, duration_final=minutes)
    with pytest.raises(ValidationError):
        RideResult(**{**fields, "ride_fingerprint": ""}, duration_final=10)
    assert RideResult(**fields, duration_final=60).duration_final == 60


def test_valid_ride_is_predicted_and_published_with_model_identity():
    publisher = RecordingPublisher()
    result = service(publisher).handle(b64(RIDE), message_id="m1")
    fingerprint = Ride.model_validate(RIDE).fingerprint()
    # The function's own time to answer, for the rollout's p95: measured, so only its range is known.
    assert 0 < result.answer_ms < 1000
    assert result == RideResult(
        ride_id="r-1",
        duration_final=24.0,
        model_run_id="run-1",
        model_version="7",
        ride_fingerprint=fingerprint,
        answer_ms=result.answer_ms,
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
                "clipped": False,
                "answer_ms": result.answer_ms,
                "duration_low": None,  # a model without a range
                "duration_high": None,
            },
            {"ride_id": "r-1"},
        )
    ]


class FakeInterval:
    """A range of raw low/high minutes around every ride, whatever the ride."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def predict(self, rides):
        return np.full(len(rides), self.low), np.full(len(rides), self.high)


@pytest.mark.parametrize(
    ("raw", "low", "high", "served"),
    [
        ((18.0, 31.5), 18.0, 31.5, "as given"),
        ((-4.0, 75.0), 1.0, 60.0, "clipped into the bounds"),
        ((25.0, 30.0), 24.0, 30.0, "widened to hold the final (24.0)"),
        ((10.0, 20.0), 10.0, 24.0, "widened to hold the final (24.0)"),
    ],
)
def test_a_model_with_a_range_answers_with_it_clipped_and_holding_the_final(raw, low, high, served, capsys):
    publisher = RecordingPublisher()
    svc = RideDurationService(FakeModel(), ride_contract, publisher, "results", "dead", "run-1", "7", interval=FakeInterval(*raw))
    result = svc.handle(b64(RIDE), "m1")
    assert (result.duration_low, result.duration_final, result.duration_high) == (low, 24.0, high), served
    assert publisher.sent[0][1]["duration_low"] == low and publisher.sent[0][1]["duration_high"] == high
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"prediction"' in line]
    assert (record["duration_low"], record["duration_high"]) == (low, high)  # the monitoring record keeps it


def test_the_result_message_refuses_a_range_that_does_not_hold_its_answer():
    from pydantic import ValidationError

    fields = {"ride_id": "r", "model_run_id": "run", "ride_fingerprint": "abc", "duration_final": 20}
    for bounds in ({"duration_low": 21, "duration_high": 30}, {"duration_low": 10, "duration_high": 19.99}, {"duration_low": 10}):
        with pytest.raises(ValidationError):
            RideResult(**fields, **bounds)
    with pytest.raises(ValidationError):
        RideResult(**fields, duration_low=0.5, duration_high=30)  # the range is held to the bounds too
    assert RideResult(**fields, duration_low=20, duration_high=20).duration_high == 20
    assert RideResult(**fields).duration_low is None  # a model without a range


def test_model_gets_the_validated_ride():
    model = FakeModel()
    service(model=model).handle(b64(RIDE), message_id="m1")
    assert model.calls == [[Ride.model_validate(RIDE)]]


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
    assert len(model.calls) == 1
    assert len(publisher.sent) == 2 and publisher.sent[0] == publisher.sent[1]  # one logical result


def test_a_reused_ride_id_with_another_ride_is_predicted_afresh():
    publisher, model = RecordingPublisher(), FakeModel()
    svc = service(publisher, model)
    first = svc.handle(b64(RIDE), "m1")
    other = svc.handle(b64({**RIDE, "trip_distance": 30}), "m2")  # same ride_id, a 30-mile ride
    assert (first.duration_final, other.duration_final) == (24.0, 60.0)
    assert first.ride_fingerprint != other.ride_fingerprint
    assert len(model.calls) == 2


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
    assert service(publisher).handle(data, message_id="m9", attributes={"ride_id": "r-9", "sender": "app"}) is None
    [(topic, record, attributes)] = publisher.sent
    assert topic == "dead"
    assert reason in record["reason"] and reason in attributes["reason"]
    assert record["data"] == (data or "") and record["message_id"] == "m9"
    # Which deployment refused it, in which format, and the message's own attributes.
    assert attributes["deployment"] == record["deployment"] == "function-prod"
    assert attributes["format"] == record["format"] == prediction.DEAD_LETTER_FORMAT
    assert record["attributes"] == {"ride_id": "r-9", "sender": "app"} and record["model_version"] == "7"


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


def test_load_model_reads_the_serving_form_which_predicts_like_the_logged_pipeline(local_model, monkeypatch):
    import mlflow

    from training.registry import promote, resolve

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # our own model
    result, settings = local_model
    promote(result.version, settings)
    resolved = resolve("production", settings)
    loaded = load_model(resolved.artifact_uri)
    assert loaded.run_id == result.run_id and loaded.model_id.startswith("m-")
    assert loaded.contract.__name__ == "ride_contract" and loaded.model.kind == "hist_gradient_boosting"
    rides = [Ride.model_validate(RIDE), Ride.model_validate({**RIDE, "trip_distance": 1.5})]
    minutes = loaded.model.predict(rides)
    mlflow.set_tracking_uri(settings.tracking_uri)
    pipeline = mlflow.sklearn.load_model(result.model_uri)
    np.testing.assert_allclose(minutes, pipeline.predict(rides_frame(rides)), atol=1e-9)
    assert minutes[0] > minutes[1]
    # Its range: the quantile models' serving forms, with the margin training calibrated.
    run = mlflow.get_run(result.run_id)
    low, high = loaded.interval.predict(rides)
    assert loaded.interval.margin == pytest.approx(run.data.metrics["interval_margin_minutes"])
    assert loaded.interval.description["calibrated_on"] == ["2021-02"]
    assert np.all(low < minutes) and np.all(minutes < high)


def test_load_model_names_the_uri_it_tried(tmp_path):
    with pytest.raises(ModelNotFound, match=re.escape(str(tmp_path))):
        load_model(str(tmp_path))


def test_a_model_logged_before_the_ride_contract_is_refused_with_the_reason(tmp_path):
    # Versions registered before ride_contract existed ship code/training instead.
    (tmp_path / "MLmodel").write_text("run_id: old-run\nflavors:\n  sklearn:\n    pickled_model: model.pkl\n")
    (tmp_path / "code" / "training").mkdir(parents=True)
    with pytest.raises(ModelNotFound, match=r"does not ship the ride contract .*retrain"):
        load_model(str(tmp_path))


def test_concurrent_rides_each_get_their_own_answer():
    import threading

    class SlowModel(FakeModel):
        def predict(self, rides):
            threading.Event().wait(0.01)  # requests overlap inside the model
            return super().predict(rides)

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


def test_a_failing_model_fails_the_request_so_it_is_redelivered():
    class BrokenModel:
        def predict(self, rides):
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


def _model_folder(tmp_path, flavors: dict, files: dict[str, bytes]):
    """A logged-model folder as MLflow writes it: MLmodel (YAML), code/ride_contract, extra files."""
    import shutil

    import yaml

    (tmp_path / "MLmodel").write_text(yaml.safe_dump({"run_id": "run-7", "model_id": "m-7", "flavors": flavors}))
    shutil.copytree(REPO / "ride_contract", tmp_path / "code" / "ride_contract")
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    return str(tmp_path)


def _linear_form() -> bytes:
    """A serving form of a linear model: 3 minutes for any zone pair, plus 2 minutes per mile."""
    import io

    from ride_contract.features import FEATURE_COLUMNS
    from ride_contract.serving_form import FORMAT, PAIR_BASE

    buffer = io.BytesIO()
    np.savez(
        buffer,
        format=np.array(FORMAT),
        feature_columns=np.array(FEATURE_COLUMNS),
        kind=np.array("linear"),
        numeric_features=np.array([FEATURE_COLUMNS.index("trip_distance")]),
        pair_table=np.full(PAIR_BASE * PAIR_BASE, 3.0),
        numeric_coefficients=np.array([2.0]),
    )
    return buffer.getvalue()


SERVED = {"sklearn": {"pickled_model": "model.pkl", "extra_files": [{"path": "extra_files/serving_form.npz"}]}}


def test_the_serving_form_is_found_through_the_sklearn_flavors_extra_files_and_nothing_is_unpickled(tmp_path):
    folder = _model_folder(tmp_path, SERVED, {"extra_files/serving_form.npz": _linear_form(), "model.pkl": b"not a pickle"})
    loaded = load_model(folder)
    assert (loaded.run_id, loaded.model_id, loaded.model.kind) == ("run-7", "m-7", "linear")
    assert loaded.model.predict([Ride.model_validate(RIDE)]).tolist() == [3.0 + 2.0 * 12]
    assert loaded.interval is None  # logged without a range: its answers carry none


RANGED = {
    "sklearn": {
        "pickled_model": "model.pkl",
        "extra_files": [
            {"path": f"extra_files/{name}"}
            for name in ("serving_form.npz", "interval.json", "serving_form_low.npz", "serving_form_high.npz")
        ],
    }
}


def _interval_json(margin) -> bytes:
    return json.dumps({"format": "ridestream-interval/1", "margin_minutes": margin, "nominal_coverage": 0.8}).encode()


def test_a_model_with_a_range_loads_its_quantile_forms_and_margin(tmp_path):
    form = _linear_form()  # 3 + 2 min per mile, for all three: the margin alone makes the range
    files = {f"extra_files/{n}": form for n in ("serving_form.npz", "serving_form_low.npz", "serving_form_high.npz")}
    loaded = load_model(_model_folder(tmp_path, RANGED, {**files, "extra_files/interval.json": _interval_json(2.5)}))
    low, high = loaded.interval.predict([Ride.model_validate(RIDE)])
    assert (low.tolist(), high.tolist()) == ([27.0 - 2.5], [27.0 + 2.5])


@pytest.mark.parametrize(
    ("interval", "high_form", "message"),
    [
        (b"{", True, "not a readable interval description"),
        (_interval_json("wide"), True, "not a readable interval description"),
        (_interval_json(float("nan")), True, "margin of nan"),
        (_interval_json(1.0), False, "not a readable serving form"),
    ],
)
def test_a_model_whose_listed_range_does_not_load_is_refused(tmp_path, interval, high_form, message):
    files = {f"extra_files/{n}": _linear_form() for n in ("serving_form.npz", "serving_form_low.npz")}
    if high_form:
        files["extra_files/serving_form_high.npz"] = _linear_form()
    with pytest.raises(ModelNotFound, match=message):
        load_model(_model_folder(tmp_path, RANGED, {**files, "extra_files/interval.json": interval}))


@pytest.mark.parametrize(
    ("flavors", "files", "message"),
    [
        ({"python_function": {"loader_module": "mlflow.pyfunc.model"}}, {}, r"not an sklearn model \(flavors: python_function\)"),
        ({"sklearn": {"pickled_model": "model.pkl"}}, {"model.pkl": b"x"}, r"no serving form .*retrain"),
        (SERVED, {}, "no such file"),
        (SERVED, {"extra_files/serving_form.npz": b"garbage"}, "not a readable serving form"),
    ],
)
def test_a_model_the_function_cannot_load_is_refused_saying_why(tmp_path, flavors, files, message):
    with pytest.raises(ModelNotFound, match=message):
        load_model(_model_folder(tmp_path, flavors, files))


def test_a_serving_form_of_another_format_is_refused(tmp_path):
    import io

    with np.load(io.BytesIO(_linear_form())) as data:
        arrays = dict(data)
    buffer = io.BytesIO()
    np.savez(buffer, **{**arrays, "format": np.array("ridestream-serving-form/99")})
    folder = _model_folder(tmp_path, SERVED, {"extra_files/serving_form.npz": buffer.getvalue()})
    with pytest.raises(ModelNotFound, match=r"format 'ridestream-serving-form/99'"):
        load_model(folder)


def test_the_cold_start_imports_neither_scikit_learn_scipy_nor_pandas(local_model, tmp_path):
    """The function's module, started as functions-framework would import it, on a real logged model."""
    import os
    import subprocess
    import sys

    import mlflow

    result, settings = local_model
    logged = mlflow.MlflowClient(settings.tracking_uri).get_logged_model(result.model_uri.rpartition("/")[2])
    check = (
        "import sys, main; "
        "print(main.SERVICE.model.kind, sorted(m for m in ('sklearn', 'scipy', 'pandas', 'pyarrow', 'mlflow') if m in sys.modules))"
    )
    env = {
        **os.environ,
        "MODEL_URI": logged.artifact_location,
        "RUN_ID": result.run_id,
        "GOOGLE_CLOUD_PROJECT": "cold-start",
        "BACKEND_PULL_STREAM": "results",
        "BACKEND_DEADLETTER_STREAM": "dead",
    }
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO / "serving_function", env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split("\n")[-2] == "hist_gradient_boosting []", out.stdout + out.stderr


def test_a_publish_the_broker_never_takes_fails_within_the_publish_timeout(monkeypatch):
    import socket
    import time

    with socket.socket() as sock:  # a Pub/Sub address nothing answers at
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{sock.getsockname()[1]}")
    publisher = prediction.PubSubPublisher("ridestream-local", timeout=2.0)
    started = time.monotonic()
    with pytest.raises(Exception) as failure:  # the function fails the request: Pub/Sub redelivers the ride
        publisher.publish("results", b"{}", ride_id="r-1")
    assert time.monotonic() - started < 10
    assert type(failure.value).__module__.startswith("google.api_core")


def test_failed_cold_starts_leave_no_model_download_behind(tmp_path, monkeypatch):
    """Each cold start downloads the model into a temporary folder; none may outlive it, loaded or not."""
    from serving_function import model_store

    (tmp_path / "bucket").mkdir()
    folder = Path(_model_folder(tmp_path / "bucket", SERVED, {"extra_files/serving_form.npz": b"not a serving form"}))
    files = {f"m/{path.relative_to(folder)}": path for path in folder.rglob("*") if path.is_file()}

    class FakeBlob:
        def __init__(self, name):
            self.name = name

        def download_to_filename(self, target, **kwargs):
            Path(target).write_bytes(files[self.name].read_bytes())

    class FakeStorage:  # what _download_folder asks of the storage client
        def list_blobs(self, bucket, prefix, **kwargs):
            return [FakeBlob(name) for name in files]

    monkeypatch.setattr(model_store, "_storage_client", FakeStorage)
    cache = tmp_path / "tmp"
    cache.mkdir()
    for _ in range(5):
        with pytest.raises(ModelNotFound, match="serving form"):
            model_store.load_model("gs://bucket/m", cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_a_model_whose_contract_has_no_duration_bounds_is_refused(tmp_path, monkeypatch):
    import sys

    folder = Path(_model_folder(tmp_path, SERVED, {"extra_files/serving_form.npz": _linear_form()}))
    result_module = folder / "code" / "ride_contract" / "result.py"
    result_module.write_text(result_module.read_text().replace("def served_minutes", "def _old_unbounded"))
    for name in [m for m in sys.modules if m == "ride_contract" or m.startswith("ride_contract.")]:
        monkeypatch.delitem(sys.modules, name)  # import the model's own copy, as a cold start does
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ModelNotFound, match="without duration bounds"):
        load_model(str(folder))


def test_the_function_looks_for_the_file_training_writes():
    from ride_contract.serving_form import FILE_NAME, HIGH_FORM_FILE, INTERVAL_FILE, LOW_FORM_FILE
    from serving_function import model_store

    assert model_store.SERVING_FORM_FILE == FILE_NAME
    assert model_store.RANGE_FILES == (INTERVAL_FILE, LOW_FORM_FILE, HIGH_FORM_FILE)


def test_with_no_model_configured_the_function_starts_and_refuses_rides_for_redelivery():
    """Terraform creates the function's service serving no model (the rollout controller deploys the first one).
    The instance must start (else the service never becomes ready and the apply fails), and a ride pushed to it
    must get an error status, so Pub/Sub redelivers it: never a 2xx, which would acknowledge it unanswered."""
    import os
    import subprocess
    import sys

    check = (
        "import json, main, functions_framework; "
        "app = functions_framework.create_app('predict_duration_cloudevent', 'main.py'); "
        "push = {'message': {'data': '', 'messageId': 'm-1', 'attributes': {}}, 'subscription': 'projects/p/subscriptions/s'}; "
        "r = app.test_client().post('/', json=push); "
        "print(main.SERVICE is None, r.status_code)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_ID", "MODEL_URI")}
    env |= {
        "GOOGLE_CLOUD_PROJECT": "no-model",
        "MODEL_BUCKET": "models",
        "BACKEND_PULL_STREAM": "results",
        "BACKEND_DEADLETTER_STREAM": "dead",
    }
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO / "serving_function", env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    no_service, status = out.stdout.split("\n")[-2].split()
    assert no_service == "True" and int(status) >= 500, out.stdout + out.stderr
    assert "no model configured" in out.stdout + out.stderr
