"""Load NYC TLC trip parquet files as ride frames with a duration target.

Sources: a local path, a ``gs://bucket/key`` URI, or an ``https://`` URL (the
public TLC download). Only the columns a ride request carries are read, and they
are cast to one schema, so TLC's schema drift between months (int32 IDs from
2023-02, null-typed ``ehail_fee`` ...) does not matter.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data.gcs import split_gs_uri
from data.progress import progress_bar
from ride_contract.ride import MAX_DURATION_MINUTES, MIN_DURATION_MINUTES

DATA_DIR = Path(__file__).resolve().parent
ZONE_LOOKUP = DATA_DIR / "taxi_zone_lookup.csv"
TLC_DOWNLOAD_BASE = "https://d37ci6vzurychx.cloudfront.net/trip-data"
DOWNLOAD_TIMEOUT_SECONDS = 60

# Green files use lpep_*, yellow files tpep_*; both are read the same way.
PICKUP_COLUMNS = {"lpep_pickup_datetime": "lpep_dropoff_datetime", "tpep_pickup_datetime": "tpep_dropoff_datetime"}
RIDE_SCHEMA = pa.schema(
    [
        ("datetime", pa.timestamp("us")),
        ("dropoff", pa.timestamp("us")),
        ("PULocationID", pa.int64()),
        ("DOLocationID", pa.int64()),
        ("trip_distance", pa.float64()),
    ]
)
_MONTH_IN_NAME = re.compile(r"(\d{4}-\d{2})\.parquet$")
_MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


class TripDataError(ValueError):
    """A trip file that cannot be used: missing, unreachable, or not TLC trip data."""


def month_uri(month: str, base: str | Path = DATA_DIR, color: str = "green") -> str:
    """Where a month's file lives under ``base`` (a folder, ``gs://`` prefix or URL)."""
    if not _MONTH.match(month):
        raise TripDataError(f"month must look like 2021-01, got {month!r}")
    return f"{str(base).rstrip('/')}/{color}_tripdata_{month}.parquet"


def available_months(base: str | Path = DATA_DIR, color: str = "green") -> list[str]:
    """Months with a file under ``base`` (a folder or a gs:// prefix), oldest first."""
    pattern = re.compile(rf"{color}_tripdata_(\d{{4}}-\d{{2}})\.parquet$")
    base = str(base)
    if base.startswith("gs://"):
        from google.cloud import storage

        bucket, prefix = split_gs_uri(base)
        names = [b.name for b in storage.Client().list_blobs(bucket, prefix=prefix + "/" if prefix else None)]
    elif base.startswith(("http://", "https://")):
        raise TripDataError(f"cannot list months at {base}: name the months explicitly")
    else:
        names = [p.name for p in Path(base).glob(f"{color}_tripdata_*.parquet")]
    return sorted({m.group(1) for name in names if (m := pattern.search(name))})


def latest_split(base: str | Path = DATA_DIR, color: str = "green") -> tuple[str, str, str]:
    """The newest three consecutive months as (train, validation, test)."""
    months = [pd.Period(m, freq="M") for m in available_months(base, color)]
    for test in reversed(months):
        if test - 1 in months and test - 2 in months:
            return str(test - 2), str(test - 1), str(test)
    raise TripDataError(f"no three consecutive months of {color} trip data under {base}")


def read_zones(path: str | Path = ZONE_LOOKUP) -> pd.DataFrame:
    """TLC's taxi zone lookup: LocationID, Borough, Zone (one row per zone ID)."""
    if not Path(path).is_file():
        raise TripDataError(f"{path} does not exist")
    zones = pd.read_csv(path, usecols=["LocationID", "Borough", "Zone"], dtype={"LocationID": "int64"}, keep_default_na=False)
    if zones["LocationID"].duplicated().any():
        raise TripDataError(f"{path} names a zone ID twice")
    return zones


def _read_bytes(uri: str) -> bytes:
    if uri.startswith("gs://"):
        from google.api_core import exceptions as gexc
        from google.cloud import storage

        bucket, key = split_gs_uri(uri)
        try:
            return storage.Client().bucket(bucket).blob(key).download_as_bytes()
        except gexc.NotFound as exc:
            raise TripDataError(f"{uri} does not exist") from exc
        except gexc.GoogleAPICallError as exc:
            raise TripDataError(f"cannot read {uri}: {exc}") from exc
    try:
        with urllib.request.urlopen(uri, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:  # noqa: S310 - http(s) only
            return response.read()
    except urllib.error.HTTPError as exc:
        # The TLC CDN answers 403 (not 404) for months it has not published.
        raise TripDataError(f"{uri} is not available (HTTP {exc.code}): no such month published yet?") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TripDataError(f"cannot download {uri}: {reason} (offline?)") from exc


def _open_parquet(uri: str) -> pq.ParquetFile:
    if uri.startswith(("gs://", "http://", "https://")):
        source: str | pa.BufferReader = pa.BufferReader(_read_bytes(uri))
    else:
        if not Path(uri).is_file():
            raise TripDataError(f"{uri} does not exist")
        source = uri
    try:
        return pq.ParquetFile(source)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TripDataError(f"{uri} is not a parquet file ({exc})") from exc


def _file_month(uri: str, pickups: pd.Series) -> pd.Period | None:
    named = _MONTH_IN_NAME.search(uri)
    if named:
        return pd.Period(named.group(1), freq="M")
    if pickups.empty:
        return None
    # No month in the name: the month most pickups fall in is the file's month.
    return pickups.dt.to_period("M").mode().iloc[0]


def read_trips(uri: str | Path) -> pd.DataFrame:
    """One TLC trip file as rides with ``duration`` minutes, filtered to 1-60 min and the file's month."""
    uri = str(uri)
    parquet = _open_parquet(uri)
    names = set(parquet.schema_arrow.names)
    pickup_col = next((c for c in PICKUP_COLUMNS if c in names), None)
    needed = [pickup_col or "lpep_pickup_datetime", PICKUP_COLUMNS.get(pickup_col, "lpep_dropoff_datetime")]
    needed += ["PULocationID", "DOLocationID", "trip_distance"]
    missing = [c for c in needed if c not in names]
    if missing:
        raise TripDataError(f"{uri} is not TLC trip data: missing columns {', '.join(missing)}")
    table = parquet.read(columns=needed).rename_columns(RIDE_SCHEMA.names)
    try:
        table = table.cast(RIDE_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TripDataError(f"{uri} has unexpected column types: {exc}") from exc

    trips = table.to_pandas()
    trips["duration"] = (trips.pop("dropoff") - trips["datetime"]).dt.total_seconds() / 60
    keep = trips["duration"].between(MIN_DURATION_MINUTES, MAX_DURATION_MINUTES)
    month = _file_month(uri, trips["datetime"])
    if month is not None:
        # Every TLC month holds a few pickups from other months (even 2009).
        keep &= trips["datetime"].dt.to_period("M") == month
    keep &= trips["PULocationID"].notna() & trips["DOLocationID"].notna()
    # IDs come back as float when a file has nulls in them; they are ints again once those rows are gone.
    return trips[keep].astype({"PULocationID": "int64", "DOLocationID": "int64"}).reset_index(drop=True)


def load_trips(uris: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Several trip files as one frame, in the order given."""
    uris = [uris] if isinstance(uris, (str, Path)) else list(uris)
    if not uris:
        raise TripDataError("no trip files given")
    if not any(str(u).startswith(("gs://", "http://", "https://")) for u in uris):
        return pd.concat([read_trips(u) for u in uris], ignore_index=True)
    frames = []
    with progress_bar() as progress:  # downloads take a while: one step per file, on a terminal only
        reading = progress.add_task("reading TLC months", total=len(uris))
        for uri in uris:
            progress.update(reading, description=f"reading {str(uri).rpartition('/')[2]}")
            frames.append(read_trips(uri))
            progress.advance(reading)
    return pd.concat(frames, ignore_index=True)
