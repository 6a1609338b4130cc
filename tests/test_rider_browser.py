"""The rider page in a real browser (Debian's headless chromium, driven through Debian's chromedriver)
against the real local stack: the emulators, the function, two backend replicas and a Redis of the
test's own. `make browser` installs the browser; `make screenshot` regenerates the README's picture.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import requests
from conftest import started_as_client

from devstack.faults import FaultStack
from devstack.stack import LOCAL_BACKEND_SETTINGS
from ride_contract.ride import NYC

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# A short failure bound, so "only the coarse estimate" is reached in seconds: the backend resends a
# ride every 2 s and gives up after 4 publishes (production: every 30 s, 5 times).
BACKEND_SETTINGS = {"RESEND_AFTER_SECONDS": "2", "RESEND_MAX_ATTEMPTS": "4", "PUBLISH_TIMEOUT_SECONDS": "3"}
PHONE_VIEWPORT = (412, 1150)  # CSS pixels: a common Android phone's width
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
    # A phone's viewport (headless windows are never narrower than 500 px): the page's narrowest target.
    width, height = PHONE_VIEWPORT
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True}
    )
    yield driver
    driver.quit()


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
