"""The rider page: one HTML page and its script, served by the backend itself (no build step, no
second deployable). The page calls the same JSON API as any client, with no extra powers.

  GET /                                   the page
  GET /static/rider.js, /static/rider.css its script and style (no inline script or style: see CSP)
  GET /zones                              the zones a rider can pick, by borough and name
  GET /zones/<pickup>/<dropoff>/distance  the typical trip distance between two zones
"""

from __future__ import annotations

from flask import Blueprint, jsonify, render_template

from ride_contract.zones import ZoneGuide

# Only the backend's own script, style and API; no inline code, no framing, no plugins. A rider's
# typed text reaches the page as text only (rider.js never writes HTML), and this forbids the rest.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# The zone list changes only with a new image: browsers and Cloud CDN may keep it for an hour.
ZONES_CACHE_SECONDS = 3600


def rider_page(guide: ZoneGuide, final_bound_seconds: float, max_wait_seconds: float) -> Blueprint:
    # The script and style are the app's static files (backend/static), the page its template (backend/templates).
    page = Blueprint("rider_page", __name__)
    # "Unknown" (264) is not a place a rider can pick; "Outside of NYC" (265) is.
    zones = [{"id": zone.id, "borough": zone.borough, "zone": zone.name} for zone in guide.zones if zone.name not in ("N/A", "")]

    @page.get("/")
    def index():
        # How long the page waits for the final before it says only the coarse estimate is available:
        # the backend's own bound (it marks the ride failed then), plus one long poll.
        html = render_template(
            "rider.html", final_bound_seconds=round(final_bound_seconds + max_wait_seconds), max_wait_seconds=max_wait_seconds
        )
        return html, 200, {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"}

    @page.get("/zones")
    def zone_list():
        response = jsonify({"zones": zones, "trained_on": guide.trained_on})
        response.cache_control.public = True
        response.cache_control.max_age = ZONES_CACHE_SECONDS
        return response

    @page.get("/zones/<int:pickup>/<int:dropoff>/distance")
    def typical_distance(pickup: int, dropoff: int):
        for zone_id in (pickup, dropoff):
            if guide.zone(zone_id) is None:
                return jsonify({"error": f"unknown zone {zone_id}"}), 404
        typical = guide.typical_distance(pickup, dropoff)
        if typical is None:
            message = "no trips between these zones or their boroughs in the data: enter the distance"
            return jsonify({"error": message, "pickup": pickup, "dropoff": dropoff}), 404
        return jsonify({"pickup": pickup, "dropoff": dropoff, **typical.__dict__, "trained_on": guide.trained_on})

    return page


def add_security_headers(response):
    """On every answer, the API's JSON included: never sniffed as another type, never framed."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
