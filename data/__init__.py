"""Real NYC TLC trip files and their loader."""

from data.gcs import split_gs_uri
from data.loader import (
    DATA_DIR,
    TLC_DOWNLOAD_BASE,
    TripDataError,
    available_months,
    latest_split,
    load_trips,
    month_uri,
    read_trips,
    read_zones,
)

__all__ = [
    "DATA_DIR",
    "TLC_DOWNLOAD_BASE",
    "TripDataError",
    "available_months",
    "latest_split",
    "load_trips",
    "month_uri",
    "read_trips",
    "read_zones",
    "split_gs_uri",
]
