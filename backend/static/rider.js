// The rider page: book a ride, show the coarse estimate at once, then the model's answer as it arrives.
//
// It talks to the same JSON API as any client (POST /predict, GET /rides/<id>?wait=N, POST
// /rides/<id>/outcome). The outcome carries the ride's outcome_token, which only the POST's answer holds:
// the page keeps it for the tab's session (sessionStorage), so a reload can still report the ride, another
// browser cannot. The final is fetched by long-polling: each GET waits up to the backend's
// MAX_WAIT_SECONDS for the answer and is then asked again, so every request is short (well inside Cloud
// Run's request timeout), holds no instance open between polls, and can land on any replica (results
// live in the shared store). Everything shown is set as text (textContent, option.value): nothing a
// rider types, or any answer holds, is ever parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const settings = document.body.dataset;
  // After this long without a final (the backend's failure bound, plus one poll), only the coarse estimate is shown.
  const FINAL_BOUND_MS = Number(settings.finalBoundSeconds) * 1000;
  const MAX_WAIT_SECONDS = Number(settings.maxWaitSeconds);
  // A 503 (or no answer) is retried with the same ride_id: first after 0.5 s, doubling up to 8 s, at
  // least the Retry-After the backend asks for, for up to a minute in all.
  const RETRY_FIRST_MS = 500;
  const RETRY_MAX_MS = 8000;
  const RETRY_FOR_MS = 60000;
  // Fields of the API's errors, and the input each is shown beside.
  const FIELD_INPUTS = {
    PULocationID: "pickup",
    DOLocationID: "dropoff",
    trip_distance: "distance",
    datetime: "pickup-time",
    dropoff_datetime: "dropoff-time",
    duration_minutes: "dropoff-time",
  };
  const ZONE_INPUTS = ["pickup", "dropoff"];

  const zoneIdByLabel = new Map();
  let distanceEdited = false; // the rider typed a distance: a new zone pair no longer overwrites it
  let unanswered = null; // {key, rideId}: a ride whose POST got no answer; sent again, it keeps its id
  let shownRideId = null; // the ride shown (the outcome form reports on it)
  let followed = 0; // which follow loop is current (a new ride stops the old loop)

  class Unavailable extends Error {}

  // The outcome token of each ride booked in this tab (POST /predict's answer): an outcome needs it.
  const tokenKey = (rideId) => `ridestream-outcome-token:${rideId}`;
  function rememberToken(rideId, token) {
    try {
      if (token) sessionStorage.setItem(tokenKey(rideId), token);
    } catch {
      // Storage refused (private mode, full): the token is lost with the page, the ride is not.
    }
  }
  function tokenOf(rideId) {
    try {
      return sessionStorage.getItem(tokenKey(rideId));
    } catch {
      return null;
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const text = (id, value) => {
    $(id).textContent = value;
  };
  const minutes = (value) => `${Number(value).toFixed(1)} min`;

  function nycNow() {
    // The current wall-clock time in New York, as a datetime-local value (YYYY-MM-DDTHH:MM:SS).
    const parts = new Intl.DateTimeFormat("en-CA", {
      timeZone: "America/New_York",
      year: "numeric",
      month: "2-digit",
      day: "2-digit",
      hour: "2-digit",
      minute: "2-digit",
      second: "2-digit",
      hourCycle: "h23",
    }).formatToParts(new Date());
    const part = Object.fromEntries(parts.map((p) => [p.type, p.value]));
    return `${part.year}-${part.month}-${part.day}T${part.hour}:${part.minute}:${part.second}`;
  }

  const apiDatetime = (value) => {
    // datetime-local gives "YYYY-MM-DDTHH:MM[:SS]"; the API takes "YYYY-MM-DD HH:MM:SS".
    const spaced = value.replace("T", " ");
    return spaced.length === 16 ? `${spaced}:00` : spaced;
  };

  function newRideId() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function setStatus(id, state, message) {
    const element = $(id);
    element.dataset.state = state;
    element.textContent = message;
  }

  // --- errors beside the fields -------------------------------------------------------------------
  function clearErrors(form) {
    for (const element of form.querySelectorAll(".error")) {
      element.hidden = true;
      element.textContent = "";
    }
    for (const input of form.querySelectorAll("input")) input.removeAttribute("aria-invalid");
  }

  function showFieldErrors(fields, fallbackId) {
    let first = null;
    for (const [field, problem] of Object.entries(fields)) {
      const inputId = FIELD_INPUTS[field];
      const errorId = inputId && $(`${inputId}-error`) ? `${inputId}-error` : fallbackId;
      const element = $(errorId);
      element.textContent = element.textContent ? `${element.textContent} ${problem}` : problem;
      element.hidden = false;
      if (inputId) {
        $(inputId).setAttribute("aria-invalid", "true");
        first = first || $(inputId);
      }
    }
    if (first) first.focus();
  }

  // --- the API, with retries ----------------------------------------------------------------------
  async function call(method, url, payload, onRetry, retryForMs = RETRY_FOR_MS) {
    // The answer {status, body}; a 503 or no answer is retried (the request is the same, ride_id
    // included, so a retry never books a ride twice). Unavailable once retrying is over.
    const started = Date.now();
    for (let attempt = 1; ; attempt += 1) {
      let response = null;
      let problem = "the service did not answer";
      try {
        response = await fetch(url, {
          method,
          headers: payload ? { "Content-Type": "application/json" } : {},
          body: payload ? JSON.stringify(payload) : undefined,
          cache: "no-store",
          signal: AbortSignal.timeout((MAX_WAIT_SECONDS + 15) * 1000),
        });
      } catch {
        response = null;
      }
      let body = null;
      if (response) {
        try {
          body = await response.json();
        } catch {
          body = { error: `unexpected answer (HTTP ${response.status})` };
        }
        if (![502, 503, 504].includes(response.status)) return { status: response.status, body };
        problem = body.error || `HTTP ${response.status}`;
      }
      const retryAfterMs = Number(response?.headers.get("Retry-After") || 0) * 1000;
      const backoffMs = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** (attempt - 1)) * (0.8 + 0.4 * Math.random());
      const delayMs = Math.max(retryAfterMs, backoffMs);
      if (Date.now() - started + delayMs > retryForMs) throw new Unavailable(problem);
      onRetry(problem, attempt, delayMs);
      await sleep(delayMs);
    }
  }

  const retrying = (statusId, what) => (problem, attempt, delayMs) =>
    setStatus(
      statusId,
      "retrying",
      `The service is briefly unavailable (${problem}). Trying again in ${(delayMs / 1000).toFixed(1)} s ` +
        `with the same ride (attempt ${attempt + 1})${what ? ` ${what}` : ""}.`,
    );

  // --- zones and the usual distance ---------------------------------------------------------------
  async function loadZones() {
    const { status, body } = await call("GET", "/zones", null, () => {});
    if (status !== 200) throw new Unavailable(body.error);
    const labels = new Map();
    for (const zone of body.zones) {
      const label = `${zone.zone}, ${zone.borough}`;
      labels.set(label, (labels.get(label) || 0) + 1);
    }
    const list = $("zones");
    for (const zone of body.zones) {
      let label = `${zone.zone}, ${zone.borough}`;
      if (labels.get(label) > 1) label = `${label} #${zone.id}`; // the lookup names a few zones twice
      zoneIdByLabel.set(label, zone.id);
      const option = document.createElement("option");
      option.value = label;
      list.append(option);
    }
  }

  const zoneId = (inputId) => zoneIdByLabel.get($(inputId).value.trim());

  async function suggestDistance() {
    const [pickup, dropoff] = ZONE_INPUTS.map(zoneId);
    if (pickup === undefined || dropoff === undefined) return;
    const { status, body } = await call("GET", `/zones/${pickup}/${dropoff}/distance`, null, () => {});
    if (zoneId("pickup") !== pickup || zoneId("dropoff") !== dropoff) return; // the rider moved on meanwhile
    if (status !== 200) {
      text("distance-hint", "No trips between these zones in the data: enter the distance.");
      if (!distanceEdited) $("distance").value = ""; // not the last pair's distance
      return;
    }
    const trips = Number(body.trips).toLocaleString("en-US");
    const usual = {
      "zone pair": "Usual for these zones",
      "reverse zone pair": "Usual for these zones the other way round",
      "borough pair": "Few trips between these zones; usual between their boroughs",
    }[body.basis];
    text("distance-hint", `${usual}: ${body.miles} mi (median of ${trips} trips, ${body.trained_on}).`);
    if (!distanceEdited || !$("distance").value.trim()) {
      $("distance").value = String(body.miles);
      distanceEdited = false;
    }
  }

  // --- the ride -----------------------------------------------------------------------------------
  function rideFromForm() {
    // The ride as the API takes it, or null after showing what is wrong. The zones are checked here
    // (the API knows IDs, not names); everything else is the API's to judge, and its errors are shown.
    const fields = {};
    const ride = {};
    for (const [inputId, field] of [
      ["pickup", "PULocationID"],
      ["dropoff", "DOLocationID"],
    ]) {
      const typed = $(inputId).value.trim();
      ride[field] = zoneIdByLabel.get(typed);
      if (ride[field] === undefined) {
        fields[field] = typed ? `No zone is called “${typed}”: pick one from the list.` : "Pick a zone from the list.";
      }
    }
    const distance = $("distance").value.trim();
    const miles = Number(distance);
    ride.trip_distance = distance !== "" && Number.isFinite(miles) ? miles : distance;
    ride.datetime = apiDatetime($("pickup-time").value);
    if (Object.keys(fields).length) {
      showFieldErrors(fields, "ride-error");
      return null;
    }
    return ride;
  }

  function showRide(record) {
    $("answer").hidden = false;
    text("ride-id", record.ride_id);
    text("coarse", minutes(record.duration_coarse));
    const final = $("final");
    if (record.status === "done") {
      final.dataset.minutes = String(record.duration_final);
      text("final", minutes(record.duration_final));
      const ranged = record.duration_low !== undefined && record.duration_low !== null;
      text(
        "range",
        ranged
          ? `${Number(record.duration_low).toFixed(1)} to ${Number(record.duration_high).toFixed(1)} min (about 4 rides in 5)`
          : "not given by this model version",
      );
      text("model", record.model_version ? `model version ${record.model_version}` : `model run ${record.model_run_id}`);
      setStatus("status", "done", "The model has answered.");
    } else {
      delete final.dataset.minutes;
      text("final", "waiting…");
      text("range", "…");
      text("model", "…");
    }
  }

  function shown(rideId, record) {
    // Show the ride as it stands; true once it is settled (answered, or given up on), with the outcome form.
    shownRideId = rideId;
    showRide(record);
    if (record.status !== "done" && record.status !== "failed") {
      setStatus("status", "pending", "Waiting for the model's answer…");
      return false;
    }
    if (record.status === "failed") coarseOnly();
    showOutcome();
    return true;
  }

  function coarseOnly() {
    text("final", "not available");
    text("range", "—");
    text("model", "—");
    setStatus("status", "coarse-only", "Only the coarse estimate is available: the model did not answer in time.");
  }

  async function follow(rideId, startedMs) {
    // Long-poll the ride until its final arrives, the backend gives up on it, or the bound passes.
    const loop = ++followed;
    for (;;) {
      const leftMs = startedMs + FINAL_BOUND_MS - Date.now();
      if (leftMs <= 0) return coarseOnly();
      const waitSeconds = Math.max(0, Math.min(MAX_WAIT_SECONDS, Math.floor(leftMs / 1000)));
      let answer;
      try {
        const url = `/rides/${encodeURIComponent(rideId)}?wait=${waitSeconds}`;
        answer = await call("GET", url, null, retrying("status", "to fetch the model's answer"), leftMs);
      } catch (error) {
        if (error instanceof Unavailable) return loop === followed ? coarseOnly() : undefined;
        throw error;
      }
      if (loop !== followed) return undefined; // another ride is shown now
      const { status, body } = answer;
      if (status === 404) {
        return setStatus("status", "unknown", "This ride is unknown here (or its record expired).");
      }
      if (status !== 200) return setStatus("status", "error", body.error || `HTTP ${status}`);
      if (shown(rideId, body)) return undefined;
    }
  }

  async function submitRide(event) {
    event.preventDefault();
    const form = $("ride-form");
    clearErrors(form);
    const ride = rideFromForm();
    if (!ride) return;
    const key = JSON.stringify(ride);
    const rideId = unanswered && unanswered.key === key ? unanswered.rideId : newRideId();
    unanswered = { key, rideId };
    $("estimate").disabled = true;
    $("outcome").hidden = true;
    followed += 1; // stops following the ride shown before
    $("answer").hidden = false;
    text("ride-id", rideId);
    for (const id of ["coarse", "final", "range", "model"]) text(id, "…");
    setStatus("status", "sending", "Sending your ride…");
    try {
      const { status, body } = await call("POST", "/predict", { ...ride, ride_id: rideId }, retrying("status", "to book it"));
      unanswered = null;
      if (status === 400) {
        $("answer").hidden = true;
        return showFieldErrors(body.fields || { ride: body.error }, "ride-error");
      }
      if (status !== 200 && status !== 202) {
        $("answer").hidden = true;
        return showFieldErrors({ ride: body.error || `HTTP ${status}` }, "ride-error");
      }
      rememberToken(rideId, body.outcome_token);
      history.replaceState(null, "", `#ride=${encodeURIComponent(rideId)}`);
      if (!shown(rideId, body)) follow(rideId, Date.now());
    } catch (error) {
      if (!(error instanceof Unavailable)) throw error;
      setStatus("status", "unavailable", `The service is unavailable (${error.message}). Your ride was not booked yet: try again.`);
    } finally {
      $("estimate").disabled = false;
    }
  }

  // --- the outcome --------------------------------------------------------------------------------
  function showOutcome() {
    $("outcome").hidden = false;
    if (!$("dropoff-time").value) $("dropoff-time").value = nycNow();
    const booked = Boolean(tokenOf(shownRideId));
    $("complete").disabled = !booked;
    if (booked) setStatus("outcome-status", "ready", "");
    else setStatus("outcome-status", "not-booked-here", "Only the page that booked this ride can report how long it took.");
  }

  async function submitOutcome(event) {
    event.preventDefault();
    const form = $("outcome-form");
    clearErrors(form);
    if (!shownRideId) return;
    const rideId = shownRideId;
    $("complete").disabled = true;
    try {
      const url = `/rides/${encodeURIComponent(rideId)}/outcome`;
      const payload = { dropoff_datetime: apiDatetime($("dropoff-time").value), outcome_token: tokenOf(rideId) };
      const { status, body } = await call("POST", url, payload, retrying("outcome-status", "to record it"));
      if (status === 200) {
        const said = body.duration_final !== undefined ? `; the model said ${minutes(body.duration_final)}` : "";
        setStatus("outcome-status", "recorded", `Recorded: the ride took ${minutes(body.actual_minutes)}${said}. Thank you.`);
      } else if (status === 400) {
        showFieldErrors(body.fields || { dropoff_datetime: body.error }, "dropoff-time-error");
        setStatus("outcome-status", "invalid", "");
      } else if (status === 425) {
        const from = new Date(Number(body.not_before) * 1000).toLocaleTimeString();
        setStatus("outcome-status", "too-early", `The ride cannot have ended yet: report it from ${from} on.`);
      } else if (status === 403) {
        setStatus("outcome-status", "refused", "Only the page that booked this ride can report how long it took.");
      } else if (status === 409) {
        setStatus("outcome-status", "conflict", `Another outcome is recorded for this ride: ${minutes(body.actual_minutes)}.`);
      } else {
        setStatus("outcome-status", "error", body.error || `HTTP ${status}`);
      }
    } catch (error) {
      if (!(error instanceof Unavailable)) throw error;
      setStatus("outcome-status", "unavailable", `The service is unavailable (${error.message}): try again.`);
    } finally {
      $("complete").disabled = false;
    }
  }

  async function start() {
    $("pickup-time").value = nycNow();
    $("ride-form").addEventListener("submit", submitRide);
    $("outcome-form").addEventListener("submit", submitOutcome);
    $("distance").addEventListener("input", () => {
      distanceEdited = true;
    });
    // A pick from the list fires "input"; typing a full name and leaving the field fires "change".
    for (const inputId of ZONE_INPUTS) {
      for (const type of ["input", "change"]) $(inputId).addEventListener(type, suggestDistance);
    }
    try {
      await loadZones();
    } catch (error) {
      showFieldErrors({ ride: `The zone list could not be loaded (${error.message}): reload the page.` }, "ride-error");
      return;
    }
    document.body.dataset.ready = "true";
    window.addEventListener("hashchange", showLinkedRide);
    return showLinkedRide();
  }

  async function showLinkedRide() {
    // A ride link (#ride=<id>) shows that ride, on whichever replica serves the page.
    const linked = new URLSearchParams(location.hash.slice(1)).get("ride");
    if (!linked || linked === shownRideId) return undefined;
    followed += 1; // stops following the ride shown before
    shownRideId = null;
    $("outcome").hidden = true;
    $("answer").hidden = false;
    text("ride-id", linked);
    const { status, body } = await call("GET", `/rides/${encodeURIComponent(linked)}`, null, retrying("status", ""));
    if (status !== 200) return setStatus("status", "unknown", body.error || `HTTP ${status}`);
    return shown(linked, body) ? undefined : follow(linked, Number(body.requested_at) * 1000);
  }

  start();
})();
