"""The TLC loader on the real 2021 files, on drifted schemas, and on files that are not trip data."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA, REPO

from data import TripDataError, load_trips, month_uri, read_trips


@pytest.mark.parametrize(
    ("month", "rows"),
    # TLC's counts after the 1-60 min filter are 73,908 / 61,921 / 80,372; the month filter
    # then drops the pickups dated outside the file's month (2 in January, 1 in February).
    [("2021-01", 73_906), ("2021-02", 61_920), ("2021-03", 80_372)],
)
def test_real_months_load_filtered_to_duration_and_month(month, rows):
    trips = read_trips(month_uri(month, DATA))
    assert len(trips) == rows
    assert trips["duration"].between(1, 60).all()
    assert (trips["datetime"].dt.strftime("%Y-%m") == month).all()
    assert trips.dtypes.to_dict() == {
        "datetime": "datetime64[us]",
        "PULocationID": "int64",
        "DOLocationID": "int64",
        "trip_distance": "float64",
        "duration": "float64",
    }


def test_several_months_concatenate():
    assert len(load_trips([month_uri(m, DATA) for m in ("2021-01", "2021-02")])) == 73_906 + 61_920


def _trips_table(pickups: list[str], id_type: pa.DataType, prefix: str = "lpep") -> pa.Table:
    n = len(pickups)
    pickup = pa.array(pd.to_datetime(pickups), pa.timestamp("us"))
    dropoff = pa.array(pd.to_datetime(pickups) + pd.Timedelta(minutes=12), pa.timestamp("us"))
    return pa.table(
        {
            "VendorID": pa.array([2] * n, pa.int32()),
            f"{prefix}_pickup_datetime": pickup,
            f"{prefix}_dropoff_datetime": dropoff,
            "RatecodeID": pa.array([1] * n, pa.int64()),
            "PULocationID": pa.array([74] * n, id_type),
            "DOLocationID": pa.array([75] * n, id_type),
            "passenger_count": pa.array([1] * n, pa.int64()),
            "trip_distance": pa.array([1.5] * n, pa.float64()),
            "ehail_fee": pa.array([0.0] * n, pa.float64()),
            "payment_type": pa.array([1] * n, pa.int64()),
            "trip_type": pa.array([1] * n, pa.int64()),
        }
    )


def test_drifted_schema_int32_ids_and_out_of_month_pickups(tmp_path):
    # As TLC publishes from 2023-02: int32 IDs, int64 codes, double ehail_fee; and stray 2009 pickups.
    path = tmp_path / "green_tripdata_2023-02.parquet"
    pq.write_table(
        _trips_table(["2023-02-01 08:00:00", "2023-02-28 23:30:00", "2009-01-01 00:03:25", "2023-03-01 00:10:00"], pa.int32()),
        path,
    )
    trips = read_trips(path)
    assert len(trips) == 2
    assert trips["PULocationID"].dtype == "int64" and trips["duration"].tolist() == [12.0, 12.0]


def test_months_with_different_schemas_load_together(tmp_path):
    old = tmp_path / "green_tripdata_2021-01.parquet"
    new = tmp_path / "green_tripdata_2023-02.parquet"
    pq.write_table(_trips_table(["2021-01-05 10:00:00"], pa.int64()), old)
    pq.write_table(_trips_table(["2023-02-05 10:00:00"], pa.int32()), new)
    assert len(load_trips([old, new])) == 2


def test_yellow_files_and_files_without_a_month_in_the_name(tmp_path):
    path = tmp_path / "some_export.parquet"
    pq.write_table(_trips_table(["2024-05-02 10:00:00", "2024-05-03 10:00:00", "2024-04-30 23:59:00"], pa.int32(), "tpep"), path)
    assert len(read_trips(path)) == 2  # the month most pickups fall in


def test_wrong_columns_give_one_clear_line(tmp_path):
    path = tmp_path / "green_tripdata_2021-01.parquet"
    pq.write_table(pa.table({"foo": [1], "trip_distance": [1.0]}), path)
    with pytest.raises(TripDataError) as error:
        read_trips(path)
    message = str(error.value)
    assert "\n" not in message
    assert (
        message
        == f"{path} is not TLC trip data: missing columns lpep_pickup_datetime, lpep_dropoff_datetime, PULocationID, DOLocationID"
    )


def test_not_parquet_missing_file_and_bad_month(tmp_path):
    text = tmp_path / "green_tripdata_2021-01.parquet"
    text.write_text("VendorID,lpep_pickup_datetime\n")
    with pytest.raises(TripDataError, match="is not a parquet file"):
        read_trips(text)
    with pytest.raises(TripDataError, match="does not exist"):
        read_trips(tmp_path / "green_tripdata_1999-01.parquet")
    with pytest.raises(TripDataError, match="month must look like 2021-01"):
        month_uri("2021-13")


def test_unpublished_month_over_http_is_a_clear_error():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(403)  # what the TLC CDN answers for a month it has not published

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = month_uri("2031-01", f"http://127.0.0.1:{server.server_port}/trip-data")
        with pytest.raises(TripDataError, match=r"is not available \(HTTP 403\)"):
            read_trips(uri)
    finally:
        server.shutdown()


def test_offline_download_is_a_clear_error():
    from devstack.processes import free_port

    with pytest.raises(TripDataError, match=r"cannot download .* \(offline\?\)"):
        read_trips(f"http://127.0.0.1:{free_port()}/green_tripdata_2021-01.parquet")


def test_real_file_served_over_http_loads():
    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(DATA), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert len(read_trips(month_uri("2021-02", f"http://127.0.0.1:{server.server_port}"))) == 61_920
    finally:
        server.shutdown()


@pytest.mark.integration
def test_gs_uri_through_the_storage_emulator(emulators):
    from google.cloud import storage

    bucket = storage.Client().bucket(emulators.bucket)
    bucket.blob("trip-data/green_tripdata_2021-02.parquet").upload_from_filename(str(DATA / "green_tripdata_2021-02.parquet"))
    base = f"gs://{emulators.bucket}/trip-data"
    assert len(read_trips(month_uri("2021-02", base))) == 61_920
    with pytest.raises(TripDataError, match="does not exist"):
        read_trips(month_uri("2021-03", base))


def test_training_cli_reports_bad_data_in_one_line(tmp_path):
    pq.write_table(pa.table({"foo": [1]}), tmp_path / "green_tripdata_2021-01.parquet")
    completed = subprocess.run(
        [sys.executable, "-m", "training.train", "--data-base", str(tmp_path), "--no-register"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/green_tripdata_2021-01.parquet is not TLC trip data: "
        "missing columns lpep_pickup_datetime, lpep_dropoff_datetime, PULocationID, DOLocationID, trip_distance"
    )
