"""The rider page as the backend serves it: the page, its headers, the zones and typical distances, CORS.
In a real browser on the real stack: tests/test_rider_browser.py."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pandas as pd
import pytest
from conftest import REPO, IdleListener
from test_backend import RIDE, RecordingPublisher, settings

from backend.app import create_app
from backend.results import InMemoryResultStore
from backend.settings import allowed_origins
from data import load_trips, month_uri, read_zones
from ride_contract.zones import ZoneGuide
from training.coarse import zone_guide

SHIPPED_GUIDE = REPO / "backend/zone_guide.json"


def client(**overrides):
    app = create_app(
        settings(**overrides),
        publisher=RecordingPublisher(),
        store=InMemoryResultStore(),
        listener=IdleListener(),
        outcome_publisher=RecordingPublisher(),
    )
    return app.test_client()


class Markup(HTMLParser):
    """What the page's markup holds that a Content-Security-Policy without 'unsafe-inline' would block."""

    def __init__(self):
        super().__init__()
        self.inline: list[str] = []
        self.scripts: list[str] = []
        self.labels: set[str] = set()
        self.inputs: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.inline += [f"{tag} {name}" for name in attributes if name.startswith("on") or name == "style"]
        if tag == "style":
            self.inline.append("style element")
        if tag == "script":
            self._in_script = True
            self.scripts.append(attributes.get("src") or "")
        if tag == "label":
            self.labels.add(attributes["for"])
        if tag == "input":
            self.inputs.append(attributes["id"])

    def handle_endtag(self, tag):
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append("inline script")


def test_the_page_is_served_with_a_policy_that_allows_no_inline_code_and_has_none():
    response = client(resend_after_seconds=30, resend_max_attempts=5, max_wait_seconds=10).get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    html = response.get_data(as_text=True)
    markup = Markup()
    markup.feed(html)
    assert markup.inline == []
    assert markup.scripts == ["/static/rider.js"]
    # Every input has its label (keyboard and screen-reader users reach each by name).
    assert markup.inputs and set(markup.inputs) <= markup.labels
    # The page gives up on the final after the backend's own bound (5 publishes 30 s apart) plus one long poll.
    assert 'data-final-bound-seconds="160"' in html and 'data-max-wait-seconds="10' in html


def test_the_script_and_the_api_are_never_sniffed_as_another_type():
    backend = client()
    script = backend.get("/static/rider.js")
    assert script.status_code == 200 and script.mimetype in ("text/javascript", "application/javascript")
    assert script.headers["X-Content-Type-Options"] == "nosniff"
    answer = backend.post("/predict", json=RIDE)
    assert answer.status_code == 202 and answer.headers["X-Content-Type-Options"] == "nosniff"
    assert backend.get("/static/rider.css").status_code == 200


def test_the_script_writes_text_only_never_html():
    """The page's escaping is structural: no API that parses a string as HTML or code appears in it."""
    source = (REPO / "backend/static/rider.js").read_text()
    code = re.sub(r"//.*", "", source)  # the header comment names what it avoids
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", 'setAttribute("on'):
        assert sink not in code, sink
    assert "textContent" in code


def test_the_zones_are_the_tlc_lookup_by_borough_and_name():
    body = client().get("/zones").get_json()
    lookup = read_zones()
    by_id = {zone["id"]: zone for zone in body["zones"]}
    assert 264 not in by_id  # "Unknown" is no place to pick
    assert len(by_id) == len(lookup) - 1 == 264
    for row in lookup.itertuples():
        if row.LocationID != 264:
            assert (by_id[row.LocationID]["borough"], by_id[row.LocationID]["zone"]) == (row.Borough, row.Zone)
    assert by_id[265]["zone"] == "Outside of NYC"


def test_the_shipped_zone_guide_is_what_the_january_2021_trips_give():
    trips = load_trips(month_uri("2021-01"))
    refit = zone_guide(trips, read_zones(), trained_on="green 2021-01").to_dict()
    assert json.loads(SHIPPED_GUIDE.read_text()) == json.loads(json.dumps(refit))
    # East Harlem North -> South: the month's median, over the month's trips between them.
    pair = trips[(trips.PULocationID == 74) & (trips.DOLocationID == 75) & (trips.trip_distance > 0)]
    answer = client().get("/zones/74/75/distance").get_json()
    assert answer["basis"] == "zone pair" and answer["trips"] == len(pair)
    assert answer["miles"] == round(pair.trip_distance.median(), 1)


def _small_guide() -> ZoneGuide:
    zones = pd.DataFrame({"LocationID": [1, 2, 3, 4], "Borough": ["A", "A", "B", "C"], "Zone": ["one", "two", "three", "four"]})
    trips = pd.DataFrame(
        {
            "PULocationID": [1, 1, 1, 2, 2, 2, 1, 1, 1, 3],
            "DOLocationID": [2, 2, 2, 3, 3, 3, 3, 3, 3, 1],
            "trip_distance": [1.0, 2.0, 9.0, 4.0, 5.0, 6.0, 0.0, 250.0, 7.0, 8.0],
        }
    )
    return zone_guide(trips, zones, trained_on="hand-made")


def test_a_typical_distance_is_the_pairs_median_then_the_other_way_round_then_the_boroughs():
    guide = ZoneGuide.from_dict(json.loads(json.dumps(_small_guide().to_dict())))  # as shipped: through JSON
    assert guide.typical_distance(1, 2).__dict__ == {"miles": 2.0, "trips": 3, "basis": "zone pair"}
    assert guide.typical_distance(2, 1).__dict__ == {"miles": 2.0, "trips": 3, "basis": "reverse zone pair"}
    # 1 -> 3: one measured trip (a zero and a 250 mi glitch do not count): too few, so borough A -> B,
    # the median of 2 -> 3's three trips and 1 -> 3's one.
    assert guide.typical_distance(1, 3).__dict__ == {"miles": 5.5, "trips": 4, "basis": "borough pair"}
    assert guide.typical_distance(3, 1) is None  # one trip B -> A, no pair the other way with enough
    assert guide.typical_distance(1, 4) is None and guide.typical_distance(1, 99) is None


def test_the_distance_endpoint_says_what_it_does_not_know(tmp_path):
    path = tmp_path / "guide.json"
    path.write_text(json.dumps(_small_guide().to_dict()))
    backend = client(zone_guide_path=path)
    assert backend.get("/zones/1/3/distance").get_json()["basis"] == "borough pair"
    unknown_pair = backend.get("/zones/1/4/distance")
    assert unknown_pair.status_code == 404 and "enter the distance" in unknown_pair.get_json()["error"]
    unknown_zone = backend.get("/zones/1/99/distance")
    assert unknown_zone.status_code == 404 and unknown_zone.get_json()["error"] == "unknown zone 99"


def test_no_other_origin_may_call_the_api_by_default():
    answer = client().post("/predict", json=RIDE, headers={"Origin": "https://elsewhere.example"})
    assert answer.status_code == 202 and "Access-Control-Allow-Origin" not in answer.headers
    preflight = client().options(
        "/predict", headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_a_listed_origin_may_call_the_api_and_no_other():
    backend = client(cors_allowed_origins=allowed_origins("https://app.example.com, http://127.0.0.1:3000/"))
    preflight = backend.options(
        "/predict",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Content-Type",
        },
    )
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in preflight.headers
    answer = backend.post("/predict", json=RIDE, headers={"Origin": "http://127.0.0.1:3000"})
    assert answer.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:3000"
    other = backend.post("/predict", json=RIDE, headers={"Origin": "https://app.example.com.evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


@pytest.mark.parametrize(
    "setting", ["*", "app.example.com", "https://app.example.com/path", "https://a.example, ftp://b.example"]
)
def test_an_allow_list_entry_that_is_not_an_origin_is_refused_at_start(setting):
    with pytest.raises(ValueError, match="is not an origin"):
        allowed_origins(setting)
