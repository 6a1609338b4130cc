"""NYC taxi zones by name, and the typical trip distance between two of them: what the rider page offers.

Built by ``training.coarse`` from the TLC zone lookup and a month of real trips, shipped with the
backend image beside the coarse estimator (``backend/zone_guide.json``). The page prefills the
distance with it; the rider may change it, and the ride carries whatever the rider confirmed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Fewer trips than this between two zones (or two boroughs) say little about the usual route.
MIN_TRIPS = 3


@dataclass(frozen=True)
class Zone:
    id: int
    borough: str
    name: str


@dataclass(frozen=True)
class TypicalDistance:
    miles: float
    trips: int  # how many trips of the month the median is over
    basis: str  # "zone pair", "reverse zone pair" or "borough pair"


class ZoneGuide:
    def __init__(
        self,
        zones: list[Zone],
        pairs: Mapping[tuple[int, int], tuple[float, int]],
        boroughs: Mapping[tuple[str, str], tuple[float, int]],
        trained_on: str = "",
    ):
        self.zones = sorted(zones, key=lambda zone: (zone.borough, zone.name))
        self._by_id = {zone.id: zone for zone in zones}
        self._pairs = dict(pairs)
        self._boroughs = dict(boroughs)
        self.trained_on = trained_on

    def zone(self, zone_id: int) -> Zone | None:
        return self._by_id.get(zone_id)

    def typical_distance(self, pickup: int, dropoff: int) -> TypicalDistance | None:
        """The median distance of the month's trips between the two zones; failing that (too few trips),
        of those the other way round; failing that, between the two boroughs. None for an unknown zone."""
        start, end = self.zone(pickup), self.zone(dropoff)
        if start is None or end is None:
            return None
        for key, basis in (((pickup, dropoff), "zone pair"), ((dropoff, pickup), "reverse zone pair")):
            if key in self._pairs:
                miles, trips = self._pairs[key]
                return TypicalDistance(miles, trips, basis)
        if (start.borough, end.borough) in self._boroughs:
            miles, trips = self._boroughs[(start.borough, end.borough)]
            return TypicalDistance(miles, trips, "borough pair")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "trained_on": self.trained_on,
            "min_trips": MIN_TRIPS,
            "zones": [[zone.id, zone.borough, zone.name] for zone in sorted(self.zones, key=lambda zone: zone.id)],
            # [pickup, dropoff, median miles, trips]: compact, it ships in the image.
            "pairs": [[pu, do, miles, trips] for (pu, do), (miles, trips) in sorted(self._pairs.items())],
            "boroughs": [[pu, do, miles, trips] for (pu, do), (miles, trips) in sorted(self._boroughs.items())],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ZoneGuide:
        return cls(
            [Zone(int(zone_id), borough, name) for zone_id, borough, name in data["zones"]],
            {(int(pu), int(do)): (float(miles), int(trips)) for pu, do, miles, trips in data["pairs"]},
            {(pu, do): (float(miles), int(trips)) for pu, do, miles, trips in data["boroughs"]},
            data.get("trained_on", ""),
        )
