"""The rider page in a real browser (Debian's headless chromium, driven through Debian's chromedriver)
against the real local stack: the emulators, the function, two backend replicas and a Redis of the
test's own. `make browser` installs the browser; `make screenshot` regenerates the README's picture.

Answers the backend gives only under load or failure (a 429, a 500 with an HTML body, a Retry-After as an
HTTP date) come from a real edge in front of a replica (devstack/edge.py, as Cloud Armor or a load
balancer is on Google Cloud), which answers the next matching request itself and forwards the rest.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import itertools
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import requests
from conftest import started_as_client

from devstack.edge import Edge
from devstack.faults import FaultStack
from devstack.stack import LOCAL_BACKEND_SETTINGS
from ride_contract.ride import NYC

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# A short failure bound, so "only the coarse estimate" is reached in seconds: the backend resends a
# ride every 2 s and gives up after 4 publishes (production: every 30 s, 5 times).
BACKEND_SETTINGS = {"RESEND_AFTER_SECONDS": "2", "RESEND_MAX_ATTEMPTS": "4", "PUBLISH_TIMEOUT_SECONDS": "3"}
PHONE_VIEWPORT = (412, 1150)  # CSS pixels: a common Android phone's width
SMALL_PHONE_WIDTH = 320  # the narrowest phones still in use (iPhone SE 1st generation), CSS pixels
EAST_HARLEM_NORTH, EAST_HARLEM_SOUTH = "East Harlem North, Manhattan", "East Harlem South, Manhattan"
SCREENSHOT = os.environ.get("RIDER_PAGE_SCREENSHOT")  # set by `make screenshot`: where the README's picture goes


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from started_as_client(FaultStack(tmp_path_factory.mktemp("rider") / "stack", BACKEND_SETTINGS, challenger=False))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    assert not missing, f"{', '.join(missing)} not installed: `make browser` installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, selenium never looks for (or downloads) a browser
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless=new",
        "--no-sandbox",  # as root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        # This machine's network is closed: no update checks, sync or field trials.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    service = Service(CHROMEDRIVER, log_output=str(profile / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    # A phone's viewport (headless windows are never narrower than 500 px): the page's usual target.
    _viewport(driver, PHONE_VIEWPORT[0])
    yield driver
    driver.quit()


def _viewport(driver, width: int) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": PHONE_VIEWPORT[1], "deviceScaleFactor": 1, "mobile": True},
    )


@pytest.fixture(scope="module")
def module_edge(stack):
    edge = Edge(stack.stack.backend_urls[0]).start()
    yield edge
    edge.stop()


@pytest.fixture
def edge(module_edge):
    """The edge in front of replica 0, with no rules and nothing seen yet."""
    module_edge.reset()
    yield module_edge
    module_edge.reset()


class Page:
    """The rider page in the browser, by what a rider sees and does."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.wait = lambda seconds=30: WebDriverWait(driver, seconds, poll_frequency=0.1)
        driver.get("about:blank")  # a fresh page, even where only the URL's #fragment differs
        driver.get(url)
        self.wait().until(
            lambda d: self.element("ride-form") and d.execute_script("return document.body.dataset.ready") == "true"
        )

    def element(self, element_id: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.element(element_id).text

    def state(self, element_id: str = "status") -> str | None:
        return self.element(element_id).get_attribute("data-state")

    def type(self, element_id: str, value: str) -> None:
        from selenium.webdriver.common.keys import Keys

        field = self.element(element_id)
        field.clear()
        field.send_keys(value, Keys.TAB)  # as a rider leaves the field: its change event fires

    def pick_zones(self, pickup: str, dropoff: str) -> None:
        self.type("pickup", pickup)
        self.type("dropoff", dropoff)

    def book_from_east_harlem_north_to_south(self) -> None:
        """Fill the ride in, up to the distance the page prefills: ready to submit."""
        self.pick_zones(EAST_HARLEM_NORTH, EAST_HARLEM_SOUTH)
        self.wait().until(lambda d: self.element("distance").get_attribute("value"))

    def set_time(self, element_id: str, value: str) -> None:
        # datetime-local's typing order follows the browser's locale; a rider's picker sets the value.
        self.driver.execute_script(
            "const e = document.getElementById(arguments[0]); e.value = arguments[1]; e.dispatchEvent(new Event('change'))",
            element_id,
            value,
        )

    def submit(self) -> None:
        self.element("estimate").click()

    def book_and_wait_for_the_answer(self) -> str:
        """Book the East Harlem ride and wait for the model's answer; the ride's id."""
        self.book_from_east_harlem_north_to_south()
        self.submit()
        self.until_state("done")
        return self.text("ride-id")

    def token(self, ride_id: str) -> str:
        return self.driver.execute_script("return sessionStorage.getItem(arguments[0])", f"ridestream-outcome-token:{ride_id}")

    def record_statuses(self, element_id: str = "status") -> None:
        """From now on, keep every state and text the status takes (a retry's lasts as little as 0.4 s)."""
        self.driver.execute_script(
            "const e = document.getElementById(arguments[0]); window.statusesSeen = [];"
            "new MutationObserver(() => window.statusesSeen.push([e.dataset.state, e.textContent]))"
            ".observe(e, {attributes: true, childList: true, characterData: true, subtree: true});",
            element_id,
        )

    def statuses(self, state: str) -> list[str]:
        """The texts the status had in ``state`` since record_statuses."""
        return [text for seen, text in self.driver.execute_script("return window.statusesSeen") if seen == state]

    def until_state(self, state: str, seconds: float = 30, element_id: str = "status") -> None:
        self.wait(seconds).until(lambda d: self.state(element_id) == state, f"{element_id} never became {state!r}")


def _record(stack: FaultStack, ride_id: str) -> dict:
    """The ride's record as the backends keep it in their Redis, with the ride as asked (no rider's answer shows it)."""
    import json

    import redis

    raw = redis.Redis.from_url(stack.stack.urls["redis"]).get(f"{stack.stack.redis_prefix}:ride:{ride_id}")
    return json.loads(raw) if raw else {}


def _expected(stack: FaultStack, record: dict) -> float:
    return stack.expected([record["ride"]])[0]


def _ride_ids(edge: Edge, method: str, path: str) -> list[str]:
    """The ride_id of each request of ``method`` to ``path`` the edge saw, in order (each retry's too)."""
    ids = []
    for seen in edge.requests(method, path):
        ids.append(json.loads(seen.body)["ride_id"] if seen.body else re.match(r"/rides/([^/?]+)", seen.path).group(1))
    return ids


def _wait_until_outcome_allowed(record: dict) -> None:
    # The backend answers 425 before requested_at + OUTCOME_EARLIEST_SECONDS (0.5 s here): its own rule, not a race.
    not_before = float(record["requested_at"]) + float(LOCAL_BACKEND_SETTINGS["OUTCOME_EARLIEST_SECONDS"])
    time.sleep(max(0.0, not_before - time.time()))


def _nyc_now() -> dt.datetime:
    return dt.datetime.now(NYC).replace(tzinfo=None)


def _rides_recorded(stack: FaultStack) -> int:
    import redis

    return sum(1 for _ in redis.Redis.from_url(stack.stack.urls["redis"]).scan_iter("*:ride:*"))


@pytest.mark.parametrize("replica", [0, 1])
def test_a_ride_from_zone_names_to_the_models_answer_and_its_outcome(stack, browser, replica, tmp_path):
    url = stack.stack.backend_urls[replica]
    page = Page(browser, url + "/")
    # On a phone's width, nothing is wider than the screen (no sideways scrolling).
    assert browser.execute_script("return [innerWidth, document.documentElement.scrollWidth]") == [PHONE_VIEWPORT[0]] * 2
    # The pickup time is now, in New York.
    shown = dt.datetime.fromisoformat(page.element("pickup-time").get_attribute("value"))
    assert abs(shown - dt.datetime.now(NYC).replace(tzinfo=None)) < dt.timedelta(minutes=2)
    page.set_time("pickup-time", "2021-03-15T08:30:00")

    page.pick_zones(EAST_HARLEM_NORTH, EAST_HARLEM_SOUTH)
    typical = requests.get(f"{url}/zones/74/75/distance", timeout=10).json()
    page.wait().until(lambda d: page.element("distance").get_attribute("value") == str(typical["miles"]))
    assert f"median of {typical['trips']:,} trips" in page.text("distance-hint")

    if replica == 1:  # by keyboard alone: Enter in a field submits the form
        from selenium.webdriver.common.keys import Keys

        page.element("distance").send_keys(Keys.ENTER)
    else:
        page.submit()
    page.until_state("done")
    ride_id = page.text("ride-id")
    record = _record(stack, ride_id)
    assert record["ride"] == {
        "datetime": "2021-03-15T08:30:00",
        "PULocationID": 74,
        "DOLocationID": 75,
        "trip_distance": typical["miles"],
    }
    assert page.text("coarse") == f"{record['duration_coarse']:.1f} min"
    # The answer the page shows is the model's own prediction for the ride, with its range and version.
    expected = _expected(stack, record)
    assert float(page.element("final").get_attribute("data-minutes")) == pytest.approx(expected, abs=0.005)
    assert page.text("final") == f"{expected:.1f} min"
    assert page.text("range").startswith(f"{record['duration_low']:.1f} to {record['duration_high']:.1f} min")
    assert page.text("model") == "model version 1"
    assert browser.current_url.endswith(f"#ride={ride_id}")  # a link to this ride

    # The rider marks the ride over once it could have ended (before that the backend answers 425, too early).
    not_before = float(record["requested_at"]) + float(LOCAL_BACKEND_SETTINGS["OUTCOME_EARLIEST_SECONDS"])
    time.sleep(max(0.0, not_before - time.time()))
    page.set_time("dropoff-time", "2021-03-15T08:44:30")
    page.element("complete").click()
    page.until_state("recorded", element_id="outcome-status")
    assert "the ride took 14.5 min" in page.text("outcome-status")
    assert _record(stack, ride_id)["actual_minutes"] == 14.5
    if replica == 0:
        picture = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "rider-page.png"
        picture.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(picture))
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 20_000


def test_a_ride_link_shows_the_ride_on_the_other_replica(stack, browser):
    first, second = stack.stack.backend_urls[:2]
    ride = {"datetime": "2021-03-15 18:05:00", "PULocationID": 41, "DOLocationID": 42, "trip_distance": 1.1}
    accepted = requests.post(f"{first}/predict?wait=10", json=ride, timeout=30).json()
    assert accepted["status"] == "done"
    page = Page(browser, f"{second}/#ride={accepted['ride_id']}")
    page.until_state("done")
    assert page.text("ride-id") == accepted["ride_id"]
    assert page.text("final") == f"{accepted['duration_final']:.1f} min"
    # Its outcome needs the ride's token, which only the POST's answer held: this page cannot report it.
    assert page.text("outcome-status") == "Only the page that booked this ride can report how long it took."
    assert not page.element("complete").is_enabled()


@pytest.mark.parametrize(
    ("distance", "problem"),
    [("-3", "greater than 0"), ("250", "less than or equal to 200"), ("twelve", "valid number"), ("", "valid number")],
)
def test_a_bad_distance_is_shown_beside_the_distance_and_books_nothing(stack, browser, distance, problem):
    page = Page(browser, stack.stack.backend_urls[0] + "/")
    page.book_from_east_harlem_north_to_south()
    page.type("distance", distance)
    recorded = _rides_recorded(stack)
    page.submit()
    page.wait().until(lambda d: page.element("distance-error").is_displayed())
    assert _rides_recorded(stack) == recorded
    assert problem in page.text("distance-error")  # the API's own words, beside the field
    assert page.element("distance").get_attribute("aria-invalid") == "true"
    assert page.driver.switch_to.active_element == page.element("distance")  # the cursor is where the fix goes
    assert not page.element("answer").is_displayed() and not page.element("pickup-error").is_displayed()


def test_markup_typed_into_a_field_is_shown_as_text(stack, browser):
    page = Page(browser, stack.stack.backend_urls[0] + "/")
    markup = "<img src=x onerror=\"document.title='injected'\"><b>Harlem</b>"
    page.pick_zones(markup, EAST_HARLEM_SOUTH)
    page.submit()
    page.wait().until(lambda d: page.element("pickup-error").is_displayed())
    assert page.text("pickup-error") == f"No zone is called “{markup}”: pick one from the list."
    counts = page.driver.execute_script("return [document.images.length, document.querySelectorAll('b').length, document.title]")
    assert counts == [0, 0, "ridestream: how long is my taxi ride?"]


def test_a_503_from_a_stopped_store_is_retried_with_the_same_ride_id(stack, browser):
    page = Page(browser, stack.stack.backend_urls[0] + "/")
    page.book_from_east_harlem_north_to_south()
    stack.stack.stop("redis")
    try:
        page.submit()
        page.until_state("retrying")
        ride_id = page.text("ride-id")
        page.wait().until(lambda d: "(attempt 3)" in page.text("status"))  # backing off, and saying so
        assert "result store is unavailable" in page.text("status") and "with the same ride" in page.text("status")
        assert page.text("ride-id") == ride_id
    finally:
        stack.stack.restart("redis")
    page.until_state("done", seconds=60)
    assert page.text("ride-id") == ride_id  # the ride the page kept retrying is the one booked and answered
    record = _record(stack, ride_id)
    assert record["status"] == "done" and page.text("final") == f"{_expected(stack, record):.1f} min"


def test_only_the_coarse_estimate_when_the_function_is_down_past_the_failure_bound(stack, browser):
    page = Page(browser, stack.stack.backend_urls[1] + "/")
    page.book_from_east_harlem_north_to_south()
    stack.stack.stop("function")
    try:
        submitted = time.monotonic()
        page.submit()
        page.until_state("pending", seconds=10)
        # The coarse estimate is there at once, while the final is still awaited.
        assert re.fullmatch(r"\d+\.\d min", page.text("coarse")) and page.text("final") == "waiting…"
        page.until_state("coarse-only", seconds=60)
        waited = time.monotonic() - submitted
        assert page.text("status") == "Only the coarse estimate is available: the model did not answer in time."
        record = _record(stack, page.text("ride-id"))
        assert record["status"] == "failed"  # the backend gave up too: 4 publishes, 2 s apart
        assert page.text("final") == "not available" and page.text("coarse") == f"{record['duration_coarse']:.1f} min"
        assert waited >= 6, waited
    finally:
        stack.stack.restart("function")


@pytest.mark.parametrize("width", [SMALL_PHONE_WIDTH, PHONE_VIEWPORT[0]])
def test_no_sideways_scroll_with_the_answer_and_the_outcome_form_shown(stack, browser, width):
    _viewport(browser, width)
    try:
        page = Page(browser, stack.stack.backend_urls[0] + "/")
        page.book_and_wait_for_the_answer()
        assert page.element("answer").is_displayed() and page.element("outcome").is_displayed()
        assert page.element("complete").is_displayed() and page.element("dropoff-time").is_displayed()
        sizes = browser.execute_script("return [innerWidth, document.documentElement.scrollWidth]")
        assert sizes == [width, width], sizes
    finally:
        _viewport(browser, PHONE_VIEWPORT[0])


@pytest.mark.parametrize("refused", ["POST", "GET"])
def test_a_429_is_retried_after_its_retry_after_with_the_same_ride(stack, browser, edge, refused):
    page = Page(browser, edge.url + "/")
    page.book_from_east_harlem_north_to_south()
    recorded = _rides_recorded(stack)
    body = json.dumps({"error": "too many requests: 10 per 1 minute", "retry_after_seconds": 2}).encode()
    path = "/predict" if refused == "POST" else r"/rides/[0-9a-f]+\?wait=\d+"
    edge.answer(refused, path, 429, {"Retry-After": "2", "Content-Type": "application/json"}, body)
    page.record_statuses()
    page.submit()
    page.until_state("done")
    retried = page.statuses("retrying")
    assert retried and retried[-1].startswith("The service is busy (too many requests: 10 per 1 minute). Trying again in 2."), (
        retried
    )
    ride_id = page.text("ride-id")
    tries = edge.requests(refused, path)
    assert [t.by_edge for t in tries[:2]] == [True, False] and tries[1].status in (200, 202)
    assert tries[1].at - tries[0].at >= 1.9  # not before the Retry-After (the first backoff alone is 0.4-0.6 s)
    assert set(_ride_ids(edge, refused, path)) == {ride_id}  # the same ride each time
    assert _record(stack, ride_id)["status"] == "done" and _rides_recorded(stack) == recorded + 1  # booked once
    assert page.text("status") == "The model has answered."  # the retry's words are gone


def test_a_500_with_an_html_body_then_success_books_the_ride_once(stack, browser, edge):
    page = Page(browser, edge.url + "/")
    page.book_from_east_harlem_north_to_south()
    recorded = _rides_recorded(stack)
    edge.answer("POST", "/predict", 500, {"Content-Type": "text/html"}, b"<html><h1>500 Internal Server Error</h1></html>")
    page.record_statuses()
    page.submit()
    page.until_state("done")
    retried = page.statuses("retrying")
    assert retried and "(unexpected answer (HTTP 500))" in retried[-1] and "with the same ride" in retried[-1], retried
    ride_id = page.text("ride-id")
    assert [t.status for t in edge.requests("POST", "/predict")] == [500, 202]
    assert _ride_ids(edge, "POST", "/predict") == [ride_id, ride_id]
    assert _record(stack, ride_id)["status"] == "done" and _rides_recorded(stack) == recorded + 1
    assert not page.element("ride-error").is_displayed()


@pytest.mark.parametrize("when", ["in 3 s", "past", "garbage"])
def test_a_retry_after_given_as_an_http_date(stack, browser, edge, when):
    page = Page(browser, edge.url + "/")
    page.book_from_east_harlem_north_to_south()
    retry_after = {
        "in 3 s": email.utils.formatdate(time.time() + 3, usegmt=True),  # RFC 9110's IMF-fixdate, to the second
        "past": email.utils.formatdate(time.time() - 3600, usegmt=True),
        "garbage": "soon",
    }[when]
    edge.answer("POST", "/predict", 503, {"Retry-After": retry_after, "Content-Type": "text/plain"}, b"edge: overloaded")
    page.record_statuses()
    page.submit()
    page.until_state("done")
    # A date ahead is waited for; a date past or garbage is the usual backoff: a number either way, never NaN.
    retried = page.statuses("retrying")
    assert len(retried) == 1 and re.search(r"Trying again in \d+\.\d s with the same ride \(attempt 2\)", retried[0]), retried
    tries = edge.requests("POST", "/predict")
    assert [t.status for t in tries] == [503, 202]
    assert len(set(_ride_ids(edge, "POST", "/predict"))) == 1
    if when == "in 3 s":
        assert tries[1].at - tries[0].at >= 1.5  # the date, to the second, lies 2-3 s ahead


def test_a_post_refused_for_longer_than_the_page_waits_stops_and_says_so(stack, browser, edge):
    page = Page(browser, edge.url + "/")
    page.book_from_east_harlem_north_to_south()
    recorded = _rides_recorded(stack)
    body = json.dumps({"error": "too many requests: 10 per 1 minute", "retry_after_seconds": 3600}).encode()
    edge.answer("POST", "/predict", 429, {"Retry-After": "3600", "Content-Type": "application/json"}, body)
    page.submit()
    page.until_state("unavailable")
    assert page.text("status") == (
        "The service is busy (too many requests: 10 per 1 minute). Your ride was not booked: try again in 3600 s."
    )
    assert _rides_recorded(stack) == recorded and len(edge.requests("POST", "/predict")) == 1
    first = _ride_ids(edge, "POST", "/predict")[0]
    page.submit()  # the rider tries again: the same ride, the same id
    page.until_state("done")
    assert page.text("ride-id") == first and _ride_ids(edge, "POST", "/predict") == [first, first]
    assert _rides_recorded(stack) == recorded + 1


def test_an_unknown_ride_link(stack, browser):
    unknown = "0" * 32
    page = Page(browser, f"{stack.stack.backend_urls[0]}/#ride={unknown}")
    page.until_state("unknown")
    assert page.text("status") == "This ride is unknown here (or its record expired)."
    assert page.text("ride-id") == unknown and not page.element("outcome").is_displayed()


def test_a_ride_link_that_cannot_be_loaded_says_so_instead_of_trying_again(stack, browser, edge):
    ride = {"datetime": "2021-03-15 18:05:00", "PULocationID": 41, "DOLocationID": 42, "trip_distance": 1.1}
    accepted = requests.post(f"{stack.stack.backend_urls[0]}/predict?wait=10", json=ride, timeout=30).json()
    edge.answer("GET", f"/rides/{accepted['ride_id']}", 503, {"Retry-After": "3600"}, b"")
    page = Page(browser, f"{edge.url}/#ride={accepted['ride_id']}")
    page.until_state("unavailable")
    assert "This ride could not be loaded: reload the page in 3600 s." in page.text("status")
    assert "Trying again" not in page.text("status")


def test_a_distance_lookup_that_fails_asks_for_the_distance(stack, browser, edge):
    page = Page(browser, edge.url + "/")
    edge.answer("GET", "/zones/74/75/distance", 503, {"Retry-After": "3600"}, b"")
    page.pick_zones(EAST_HARLEM_NORTH, EAST_HARLEM_SOUTH)
    page.until_state("unavailable", element_id="distance-hint")
    assert page.text("distance-hint").endswith(": enter the distance.")
    assert page.element("distance").get_attribute("value") == ""


def test_a_409_outcome_shows_the_outcome_already_recorded(stack, browser):
    url = stack.stack.backend_urls[0]
    page = Page(browser, url + "/")
    page.set_time("pickup-time", "2021-03-15T08:30:00")
    ride_id = page.book_and_wait_for_the_answer()
    _wait_until_outcome_allowed(_record(stack, ride_id))
    # The same ride reported from elsewhere first (the token is the page's), then differently on the page.
    first = requests.post(
        f"{url}/rides/{ride_id}/outcome", json={"duration_minutes": 20, "outcome_token": page.token(ride_id)}, timeout=10
    )
    assert first.status_code == 200
    page.set_time("dropoff-time", "2021-03-15T08:44:30")
    page.element("complete").click()
    page.until_state("conflict", element_id="outcome-status")
    assert page.text("outcome-status") == "Another outcome is recorded for this ride: 20.0 min."
    assert _record(stack, ride_id)["actual_minutes"] == 20


def test_an_older_browser_without_abort_signal_timeout_books_a_ride_end_to_end(stack, browser):
    # Safari before 16 (and Chrome before 103) has no AbortSignal.timeout: removed before the page loads.
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": "delete AbortSignal.timeout"})
    try:
        page = Page(browser, stack.stack.backend_urls[1] + "/")
        assert browser.execute_script("return typeof AbortSignal.timeout") == "undefined"
        page.set_time("pickup-time", "2021-03-15T08:30:00")
        ride_id = page.book_and_wait_for_the_answer()
        record = _record(stack, ride_id)
        assert page.text("final") == f"{_expected(stack, record):.1f} min"
        _wait_until_outcome_allowed(record)
        page.set_time("dropoff-time", "2021-03-15T08:44:30")
        page.element("complete").click()
        page.until_state("recorded", element_id="outcome-status")
        assert _record(stack, ride_id)["actual_minutes"] == 14.5
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})


def test_a_zone_by_its_name_alone_and_zones_named_twice_in_words(stack, browser):
    page = Page(browser, stack.stack.backend_urls[0] + "/")
    options = browser.execute_script("return Array.from(document.querySelectorAll('#zones option'), o => o.value)")
    assert not [o for o in options if "#" in o]  # no internal ids
    assert "Corona, Queens (first of two zones so named)" in options
    assert "Governor's Island/Ellis Island/Liberty Island, Manhattan (third of three zones so named)" in options
    # The name without its borough, in any case, with stray spaces: the zone, and its usual distance.
    page.pick_zones("  east harlem NORTH ", "East Harlem South")
    typical = requests.get(f"{stack.stack.backend_urls[0]}/zones/74/75/distance", timeout=10).json()
    page.wait().until(lambda d: page.element("distance").get_attribute("value") == str(typical["miles"]))
    # A name two zones share: the page asks which, in words.
    page.type("pickup", "Corona")
    page.submit()
    page.wait().until(lambda d: page.element("pickup-error").is_displayed())
    assert page.text("pickup-error") == (
        "“Corona” names 2 zones: which one? "
        "Corona, Queens (first of two zones so named); Corona, Queens (second of two zones so named)."
    )
    page.type("pickup", "corona, queens (second of two zones so named)")
    page.type("distance", "3")
    page.submit()
    page.until_state("done")
    assert _record(stack, page.text("ride-id"))["ride"]["PULocationID"] == 57
    assert _record(stack, page.text("ride-id"))["ride"]["DOLocationID"] == 75


def test_a_comma_decimal_distance(stack, browser):
    page = Page(browser, stack.stack.backend_urls[0] + "/")
    page.book_from_east_harlem_north_to_south()
    page.type("distance", "2,5")
    page.submit()
    page.until_state("done")
    assert _record(stack, page.text("ride-id"))["ride"]["trip_distance"] == 2.5


def test_the_drop_off_default_is_when_the_ride_is_marked_over_and_never_the_last_rides(stack, browser):
    page = Page(browser, stack.stack.backend_urls[1] + "/")
    pickup = (_nyc_now() - dt.timedelta(minutes=10)).replace(microsecond=0)
    page.set_time("pickup-time", pickup.isoformat())
    ride_id = page.book_and_wait_for_the_answer()
    assert page.element("dropoff-time").get_attribute("value") == ""  # not the time the answer arrived
    _wait_until_outcome_allowed(_record(stack, ride_id))
    before = _nyc_now()
    page.element("complete").click()
    page.until_state("recorded", element_id="outcome-status")
    after = _nyc_now()
    dropoff = pickup + dt.timedelta(minutes=_record(stack, ride_id)["actual_minutes"])
    assert before - dt.timedelta(seconds=2) <= dropoff <= after + dt.timedelta(seconds=1), (before, dropoff, after)
    assert page.element("dropoff-time").get_attribute("value")  # shown as it was sent
    # The next ride's form starts empty again.
    page.type("distance", "2")
    page.submit()
    page.wait().until(lambda d: page.text("ride-id") != ride_id)
    page.until_state("done")
    assert page.element("dropoff-time").get_attribute("value") == ""


def test_polls_answered_pending_at_once_are_spaced_and_never_wait_0(stack, browser, edge):
    page = Page(browser, edge.url + "/")
    page.book_from_east_harlem_north_to_south()
    # A proxy answering every long poll at once with "pending" (a stale cache, a replica restarting).
    pending = json.dumps({"ride_id": "x", "status": "pending", "duration_coarse": 9.9}).encode()
    polls = r"/rides/[0-9a-f]+\?wait=.*"
    edge.answer("GET", polls, 200, {"Content-Type": "application/json"}, pending, times=10_000)
    page.submit()
    page.until_state("pending", seconds=10)
    page.until_state("coarse-only", seconds=60)  # the page's bound passed: only the coarse estimate
    seen = edge.requests("GET", polls)
    assert len(seen) >= 2
    # Each poll asked to wait at least a second, and none followed the one before at once.
    assert all(float(poll.path.rsplit("=", 1)[1]) >= 1 for poll in seen), [poll.path for poll in seen]
    # Seen at the proxy, each arrival carries the browser's and the loopback's delays of a loaded machine (one
    # late poll makes the next gap look short: 0.71 s was seen), so a gap is judged against the defect, not the
    # timer: back-to-back polls come milliseconds apart, and on average they are a second or more apart.
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(seen)]
    assert min(gaps) >= 0.3 and sum(gaps) / len(gaps) >= 0.9, gaps


def test_an_error_of_the_page_itself_is_shown_as_such_not_as_an_outage(stack, browser):
    # A fault of the page (here: its POSTs fail with a RangeError, as a missing browser API once made
    # them fail) must read as the page's failure, not be retried as "the service did not answer".
    broken = (
        "const realFetch = window.fetch;"
        "window.fetch = (url, init) => init && init.method === 'POST'"
        " ? Promise.reject(new RangeError('a bug of the page')) : realFetch(url, init);"
    )
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": broken})
    try:
        page = Page(browser, stack.stack.backend_urls[0] + "/")
        page.book_from_east_harlem_north_to_south()
        recorded = _rides_recorded(stack)
        page.submit()
        page.until_state("page-error")
        assert page.text("status") == "This page failed (a bug of the page): reload it."
        assert _rides_recorded(stack) == recorded
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})
