"""The drift/quality monitoring flow on the real 2021 data, on a shifted copy, and on the function's own logs."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import DATA

from flows.monitoring_flow import DRIFT_SHARE_ALERT, monitoring_flow, read_prediction_log
from flows.training_flow import training_flow


@pytest.fixture
def production(tmp_path, monkeypatch, prefect_harness):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("TRIP_DATA_BASE", str(DATA))
    training_flow(trials=1, sample=15_000)


def test_february_against_january_shows_only_small_drift(production, tmp_path):
    from mlflow import MlflowClient

    result = monitoring_flow("2021-01", "2021-02", output_dir=str(tmp_path / "reports"))
    assert not result["alert"] and result["drift_share"] < DRIFT_SHARE_ALERT
    assert all(result[f"drift_score_{c}"] < 0.1 for c in ("trip_distance", "pickup_hour", "PULocationID"))
    assert 4 < result["rmse"] < 6.5  # the model on February with actual durations
    html = (tmp_path / "reports" / "drift-2021-01-vs-2021-02.html").read_text()
    assert len(html) > 10_000 and "<html" in html.lower()
    assert (tmp_path / "reports" / "drift-2021-01-vs-2021-02.png").stat().st_size > 10_000
    run = MlflowClient().get_run(result["mlflow_run_id"])
    assert run.data.metrics["drift_share"] == result["drift_share"]
    assert {a.path for a in MlflowClient().list_artifacts(result["mlflow_run_id"], "report")} == {
        "report/drift-2021-01-vs-2021-02.html",
        "report/drift-2021-01-vs-2021-02.png",
    }
    # And on the flow run in the Prefect UI: the summary as a table, the report as a link.
    from prefect.artifacts import Artifact

    table = Artifact.get("drift-summary")
    rows = {row["measure"]: row for row in json.loads(table.data)} if isinstance(table.data, str) else {}
    assert table.type == "table" and rows["drift_share"]["value"] == round(result["drift_share"], 4)
    assert rows["trip_distance"]["drift score"] == round(result["drift_score_trip_distance"], 4)
    link = Artifact.get("drift-report")
    assert f"({(tmp_path / 'reports' / 'drift-2021-01-vs-2021-02.html').as_uri()})" in link.data  # a markdown link


def test_a_shifted_month_raises_the_alert(production, tmp_path, monkeypatch):
    data = tmp_path / "shifted"
    data.mkdir()
    shutil.copy(DATA / "green_tripdata_2021-01.parquet", data)
    table = pq.read_table(DATA / "green_tripdata_2021-02.parquet")
    six_hours = pa.scalar(6 * 3600 * 1_000_000, pa.duration("us"))
    for column in ("lpep_pickup_datetime", "lpep_dropoff_datetime"):
        table = table.set_column(table.schema.get_field_index(column), column, pc.add(table[column], six_hours))
    # Rides now start in the zones next to the real ones.
    table = table.set_column(
        table.schema.get_field_index("PULocationID"), "PULocationID", pc.add(pc.multiply(table["PULocationID"], 7), 3)
    )
    pq.write_table(table, data / "green_tripdata_2021-02.parquet")
    monkeypatch.setenv("TRIP_DATA_BASE", str(data))

    result = monitoring_flow("2021-01", "2021-02", output_dir=str(tmp_path / "reports"))
    assert result["alert"]
    assert result["drift_score_pickup_hour"] > 0.1 and result["drift_score_PULocationID"] > 0.1


def test_prediction_logs_are_read_from_function_lines_and_cloud_logging_exports(tmp_path):
    ride = {"ride_id": "r1", "datetime": "2021-03-04T18:59:00", "PULocationID": 196, "DOLocationID": 28, "trip_distance": 2.5}
    own = {"severity": "INFO", "message": "prediction", "ride": ride, "duration_final": 12.5, "model_version": "3"}
    exported = {"jsonPayload": {**own, "ride": {**ride, "ride_id": "r2"}}, "severity": "INFO"}
    (tmp_path / "function.log").write_text(
        "\n".join([json.dumps(own), "gunicorn started", json.dumps({"message": "model loaded"})])
    )
    (tmp_path / "sink").mkdir()
    (tmp_path / "sink" / "00:00:00_00:59:59_S0.json").write_text(json.dumps(exported) + "\n")

    own_lines = read_prediction_log(str(tmp_path / "function.log"))
    assert own_lines["ride_id"].tolist() == ["r1"] and own_lines.attrs["unreadable_lines"] == 0
    both = read_prediction_log(str(tmp_path))
    assert sorted(both["ride_id"]) == ["r1", "r2"] and set(both["prediction"]) == {12.5}
    (tmp_path / "quiet.log").write_text("gunicorn started\n")
    with pytest.raises(ValueError, match="no prediction records"):
        read_prediction_log(str(tmp_path / "quiet.log"))
    with pytest.raises(ValueError, match="does not exist"):
        read_prediction_log(str(tmp_path / "missing.log"))
    # Two records merged on one line (concurrent writers): counted, not silently skipped.
    merged = json.dumps(own) + json.dumps({**own, "ride": {**ride, "ride_id": "r3"}})
    (tmp_path / "merged.log").write_text("\n".join([json.dumps(own), merged, "gunicorn started"]))
    assert read_prediction_log(str(tmp_path / "merged.log")).attrs["unreadable_lines"] == 1
