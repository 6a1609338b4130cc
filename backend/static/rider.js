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
  // A refusal (429), a server error (500, 502, 503, 504: the backend's or the edge's in front of it) or no
  // answer is retried with the same request, ride_id included: first after 0.5 s, doubling up to 8 s, at
  // least the Retry-After asked for, and no longer in all than the backend's own failure bound (past it,
  // the backend would have given the ride up anyway).
  const RETRY_STATUSES = [429, 500, 502, 503, 504];
  const RETRY_FIRST_MS = 500;
  const RETRY_MAX_MS = 8000;
  const RETRY_FOR_MS = FINAL_BOUND_MS;
  // Each request is given up after the longest poll plus this long (a proxy or a phone that went quiet).
  const REQUEST_SLACK_MS = 15000;
  // A long poll asks for at least this long, and polls start at least this far apart: the last second
  // before the bound is one short poll, not back-to-back wait=0 requests.
  const MIN_POLL_MS = 1000;
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

  const zoneIdByLabel = new Map(); // "east harlem north, manhattan" (lower case) -> 74
  const zoneLabelsByName = new Map(); // "east harlem north" -> ["East Harlem North, Manhattan"]; two boroughs, two labels
  let distanceEdited = false; // the rider typed a distance: a new zone pair no longer overwrites it
  let distancePair = null; // the zone pair whose usual distance was last looked up ("74/75")
  let unanswered = null; // {key, rideId}: a ride whose POST got no answer; sent again, it keeps its id
  let shownRideId = null; // the ride shown (the outcome form reports on it)
  let followed = 0; // which follow loop is current (a new ride stops the old loop)
  let outcomeRideId = null; // the ride the drop-off field was last shown for (a new ride starts it empty)

  // Retrying is over and there is no answer to show; retryAfterMs: how long the last answer asked to wait.
  class Unavailable extends Error {
    constructor(message, retryAfterMs = 0, status = 0) {
      super(message);
      this.retryAfterMs = retryAfterMs;
      this.status = status;
    }
  }

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
  function retryAfterMs(value) {
    // Retry-After is seconds or an HTTP date (RFC 9110 section 10.2.3); a date past, or anything else, is 0
    // (the normal backoff then), never NaN: NaN would make every retry immediate.
    if (!value) return 0;
    const trimmed = value.trim();
    if (/^\d+$/.test(trimmed)) return Number(trimmed) * 1000;
    const at = Date.parse(trimmed);
    return Number.isFinite(at) ? Math.max(0, at - Date.now()) : 0;
  }

  function timeoutSignal(ms) {
    // A signal that aborts after ms, and its clearing. AbortSignal.timeout is missing before Safari 16 (and
    // Chrome 103): a controller and a timer do the same there; without AbortController, no timeout at all.
    if (typeof AbortController !== "function") return { signal: undefined, clear: () => {} };
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), ms);
    return { signal: controller.signal, clear: () => clearTimeout(timer) };
  }

  async function call(method, url, payload, onRetry, retryForMs = RETRY_FOR_MS) {
    // The answer {status, body}; a refusal, a server error or no answer is retried (the request is the
    // same, ride_id included, so a retry never books a ride twice). Unavailable once retrying is over.
    const started = Date.now();
    for (let attempt = 1; ; attempt += 1) {
      let response = null;
      let problem = "the service did not answer";
      const timeout = timeoutSignal(MAX_WAIT_SECONDS * 1000 + REQUEST_SLACK_MS);
      try {
        response = await fetch(url, {
          method,
          headers: payload ? { "Content-Type": "application/json" } : {},
          body: payload ? JSON.stringify(payload) : undefined,
          cache: "no-store",
          signal: timeout.signal,
        });
      } catch (error) {
        // fetch rejects with a TypeError when the network fails and an AbortError when the timer fired;
        // anything else is this page's own fault, and shows as such (never as "service unavailable").
        const aborted = Boolean(error) && error.name === "AbortError";
        if (!(error instanceof TypeError || aborted)) throw error;
        if (aborted) problem = "the service did not answer in time";
      } finally {
        timeout.clear();
      }
      let body = null;
      let waitMs = 0;
      if (response) {
        try {
          body = await response.json();
        } catch {
          // An edge in front (a load balancer, Cloud Armor) may answer in HTML or plain text.
          body = { error: `unexpected answer (HTTP ${response.status})` };
        }
        if (body === null || typeof body !== "object") body = { error: `unexpected answer (HTTP ${response.status})` };
        if (!RETRY_STATUSES.includes(response.status)) return { status: response.status, body };
        problem = body.error || `HTTP ${response.status}`;
        waitMs = retryAfterMs(response.headers.get("Retry-After"));
      }
      const backoffMs = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** (attempt - 1)) * (0.8 + 0.4 * Math.random());
      const delayMs = Math.max(waitMs, backoffMs);
      if (Date.now() - started + delayMs > retryForMs) throw new Unavailable(problem, waitMs, response ? response.status : 0);
      onRetry(problem, attempt, delayMs, response ? response.status : 0);
      await sleep(delayMs);
    }
  }

  const retrying = (statusId, what) => (problem, attempt, delayMs, status) =>
    setStatus(
      statusId,
      "retrying",
      `${status === 429 ? "The service is busy" : "The service is briefly unavailable"} (${problem}). ` +
        `Trying again in ${(delayMs / 1000).toFixed(1)} s with the same ride (attempt ${attempt + 1})${what ? ` ${what}` : ""}.`,
    );

  function gaveUp(error) {
    // Why retrying stopped, in words, and when to try again if the service said.
    const busy = error.status === 429 ? "The service is busy" : "The service is unavailable";
    const later = error.retryAfterMs > 0 ? `in ${Math.ceil(error.retryAfterMs / 1000)} s` : "in a moment";
    return { busy, later, reason: `${busy} (${error.message})` };
  }

  function pageFailed(error) {
    // A fault of this page (not of the service): said as such, so it is not mistaken for an outage.
    setStatus("status", "page-error", `This page failed (${error && error.message ? error.message : error}): reload it.`);
    $("answer").hidden = false;
  }

  // --- zones and the usual distance ---------------------------------------------------------------
  const ORDINALS = ["first", "second", "third", "fourth", "fifth"];
  const COUNTS = ["", "one", "two", "three", "four", "five"];
  // Zone names are matched as a rider types them: any case, spaces trimmed and collapsed.
  const folded = (value) => value.trim().replace(/\s+/g, " ").toLowerCase();

  async function loadZones() {
    const { status, body } = await call("GET", "/zones", null, () => {});
    if (status !== 200) throw new Unavailable(body.error);
    const labels = new Map();
    for (const zone of body.zones) {
      const label = `${zone.zone}, ${zone.borough}`;
      labels.set(label, (labels.get(label) || 0) + 1);
    }
    const list = $("zones");
    const nth = new Map();
    for (const zone of body.zones) {
      let label = `${zone.zone}, ${zone.borough}`;
      const count = labels.get(label);
      if (count > 1) {
        // The lookup names a few zones twice or three times (Corona, Queens): told apart in words, in
        // the lookup's order, not by ids a rider cannot know.
        const index = nth.get(label) || 0;
        nth.set(label, index + 1);
        label = `${label} (${ORDINALS[index] || index + 1} of ${COUNTS[count] || count} zones so named)`;
      }
      zoneIdByLabel.set(folded(label), zone.id);
      const name = folded(zone.zone);
      zoneLabelsByName.set(name, [...(zoneLabelsByName.get(name) || []), label]);
      const option = document.createElement("option");
      option.value = label;
      list.append(option);
    }
  }

  function findZone(typed) {
    // {id} for a zone's full label, or its name alone where only one zone has it; else {labels} to choose
    // from (a name in two boroughs, or named twice), or {} for nothing at all.
    const key = folded(typed);
    if (!key) return {};
    if (zoneIdByLabel.has(key)) return { id: zoneIdByLabel.get(key) };
    // The name alone; or the name, a comma and the start of its borough ("corona, queens").
    const candidates =
      zoneLabelsByName.get(key) ||
      (zoneLabelsByName.get(key.replace(/\s*,[^,]*$/, "")) || []).filter((label) => folded(label).startsWith(key));
    if (candidates.length === 1) return { id: zoneIdByLabel.get(folded(candidates[0])) };
    return candidates.length ? { labels: candidates } : {};
  }

  const zoneId = (inputId) => findZone($(inputId).value).id;

  async function suggestDistance() {
    const [pickup, dropoff] = ZONE_INPUTS.map(zoneId);
    if (pickup === undefined || dropoff === undefined) return;
    // Once per pair: a zone matches by name before its borough is typed, and every keystroke after would
    // ask again (and a later answer would overwrite what the rider was told).
    if (`${pickup}/${dropoff}` === distancePair) return;
    distancePair = `${pickup}/${dropoff}`;
    const moved = () => zoneId("pickup") !== pickup || zoneId("dropoff") !== dropoff; // the rider moved on meanwhile
    const hint = (state, message) => setStatus("distance-hint", state, message);
    let answer;
    try {
      answer = await call("GET", `/zones/${pickup}/${dropoff}/distance`, null, () => {
        if (!moved()) hint("retrying", "Looking up the usual distance between these zones…");
      });
    } catch (error) {
      if (!(error instanceof Unavailable)) throw error;
      if (moved()) return;
      // Nothing retries past here: the rider is told to type it, not left with "looking up".
      hint("unavailable", `The usual distance could not be looked up (${error.message}): enter the distance.`);
      if (!distanceEdited) $("distance").value = ""; // not the last pair's distance
      return;
    }
    if (moved()) return;
    const { status, body } = answer;
    if (status !== 200) {
      hint("none", "No trips between these zones in the data: enter the distance.");
      if (!distanceEdited) $("distance").value = ""; // not the last pair's distance
      return;
    }
    const trips = Number(body.trips).toLocaleString("en-US");
    const usual = {
      "zone pair": "Usual for these zones",
      "reverse zone pair": "Usual for these zones the other way round",
      "borough pair": "Few trips between these zones; usual between their boroughs",
    }[body.basis];
    hint("usual", `${usual}: ${body.miles} mi (median of ${trips} trips, ${body.trained_on}).`);
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
      const found = findZone(typed);
      ride[field] = found.id;
      if (found.labels) {
        fields[field] = `“${typed}” names ${found.labels.length} zones: which one? ${found.labels.join("; ")}.`;
      } else if (ride[field] === undefined) {
        fields[field] = typed ? `No zone is called “${typed}”: pick one from the list.` : "Pick a zone from the list.";
      }
    }
    ride.trip_distance = typedMiles($("distance").value);
    ride.datetime = apiDatetime($("pickup-time").value);
    if (Object.keys(fields).length) {
      showFieldErrors(fields, "ride-error");
      return null;
    }
    return ride;
  }

  function typedMiles(value) {
    // A number of miles, with a dot or a comma as its decimal mark ("2,5" is 2.5, as many phones' keypads
    // type it); anything else goes to the API as typed, and its words show beside the field.
    const typed = value.trim();
    const decimal = /^\d*,\d+$/.test(typed) ? typed.replace(",", ".") : typed;
    const miles = Number(decimal);
    return typed !== "" && Number.isFinite(miles) ? miles : typed;
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
      // At least a second's wait even when less is left: the last poll may end up to a second past the
      // bound, rather than the last second becoming a run of wait=0 requests.
      const waitSeconds = Math.min(MAX_WAIT_SECONDS, Math.max(MIN_POLL_MS / 1000, Math.ceil(leftMs / 1000)));
      const polledAt = Date.now();
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
      // A poll that came back pending at once (a replica restarting, a proxy) is not sent again at once.
      await sleep(Math.max(0, polledAt + MIN_POLL_MS - Date.now()));
      if (loop !== followed) return undefined;
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
      if (!(error instanceof Unavailable)) return pageFailed(error);
      // Retrying stopped: said plainly. The ride keeps its id, so trying again cannot book it twice.
      const { reason, later } = gaveUp(error);
      setStatus("status", "unavailable", `${reason}. Your ride was not booked: try again ${later}.`);
    } finally {
      $("estimate").disabled = false;
    }
  }

  // --- the outcome --------------------------------------------------------------------------------
  function showOutcome() {
    $("outcome").hidden = false;
    // The drop-off time is the rider's to give; left empty, it is taken when they mark the ride completed
    // (or open the field), never when the answer arrived, and never carried over from another ride.
    if (outcomeRideId !== shownRideId) $("dropoff-time").value = "";
    outcomeRideId = shownRideId;
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
      if (!$("dropoff-time").value) $("dropoff-time").value = nycNow(); // now: the ride is over as it is marked
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
      if (!(error instanceof Unavailable)) return pageFailed(error);
      const { reason, later } = gaveUp(error);
      setStatus("outcome-status", "unavailable", `${reason}. The outcome was not recorded: try again ${later}.`);
    } finally {
      $("complete").disabled = false;
    }
  }

  async function start() {
    // An error of the page's own anywhere (an event handler, a browser without something it needs) shows.
    window.addEventListener("unhandledrejection", (event) => pageFailed(event.reason));
    window.addEventListener("error", (event) => pageFailed(event.error || event.message));
    $("pickup-time").value = nycNow();
    $("dropoff-time").addEventListener("focus", () => {
      if (!$("dropoff-time").value) $("dropoff-time").value = nycNow();
    });
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
    const loop = followed;
    text("ride-id", linked);
    for (const id of ["coarse", "final", "range", "model"]) text(id, "…"); // not the ride shown before
    setStatus("status", "loading", "Loading this ride…");
    let answer;
    try {
      answer = await call("GET", `/rides/${encodeURIComponent(linked)}`, null, retrying("status", "to load it"));
    } catch (error) {
      if (!(error instanceof Unavailable)) throw error;
      if (loop !== followed) return undefined;
      // Nothing retries past here: the status says so, instead of a "Trying again" that never comes.
      const { reason, later } = gaveUp(error);
      return setStatus("status", "unavailable", `${reason}. This ride could not be loaded: reload the page ${later}.`);
    }
    if (loop !== followed) return undefined; // the rider booked or opened another ride meanwhile
    const { status, body } = answer;
    if (status === 404) return setStatus("status", "unknown", "This ride is unknown here (or its record expired).");
    if (status !== 200) return setStatus("status", "error", body.error || `HTTP ${status}`);
    return shown(linked, body) ? undefined : follow(linked, Number(body.requested_at) * 1000);
  }

  start();
})();
