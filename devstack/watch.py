"""`python -m devstack watch`: a live view of the local stream, refreshed every second.

What it shows comes from what the stack already exposes: the backends' /readyz (the shared
store's pending rides, finals per second and latency from POST to final, results refused, and
each model's live quality on the rides whose outcome came back),
the dead-letter topic (a subscription of its own, so the inspection one keeps its messages),
and the registry against the function deployments (the same comparison `status` makes).
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import requests
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from devstack.stack import PROJECT, SUBSCRIPTIONS, Stack

REFRESH_SECONDS = 1.0


@dataclass
class Snapshot:
    stream: dict[str, Any] | None = None  # the shared store's figures (backend /readyz "stream")
    quality: dict[str, Any] | None = None  # each model on the completed rides (backend /readyz "live_quality")
    backends: dict[str, dict[str, Any] | str] = field(default_factory=dict)  # url -> readyz, or why not
    dead_letters: int = 0
    dead_letters_by_source: dict[str, int] = field(default_factory=dict)  # deployment (or Pub/Sub) -> count
    dead_letter_reasons: list[str] = field(default_factory=list)
    deployments: dict[str, Any] = field(default_factory=dict)  # alias -> Rollout.status()
    controller: dict[str, Any] = field(default_factory=dict)  # alias -> the rollout service's phase, or why not


def describe_phase(alias: str, entry: dict[str, Any]) -> str | None:
    """One line for a rollout under way (its phase, age and figures) or failing; None when settled."""
    phase = entry.get("phase")
    if phase:
        figures = phase.get("figures") or {}
        shown = ", ".join(
            f"{label} {figures[key]}"
            for key, label in (
                ("rides", "rides"),
                ("median_abs_diff_minutes", "median |N-M| min"),
                ("mean_diff_minutes", "mean N-M min"),
                ("p95_answer_ms", "p95 answer ms"),
                ("missing_rate", "unanswered"),
                ("extra_dead_letter_rate", "extra dead letters"),
            )
            if figures.get(key) is not None
        )
        return (
            f"ROLLING OUT {alias} v{phase['version']} (from v{phase.get('from') or '-'}): {phase['phase']}, "
            f"{phase.get('seconds', 0):.0f} s" + (f": {shown}" if shown else "")
        )
    if entry.get("last_error"):
        return f"FAILING {alias}: {entry['last_error'][:200]}"
    return None


# What Pub/Sub itself sets on a message it forwards after its last delivery attempt.
PUBSUB_FORWARDED = "CloudPubSubDeadLetterSourceSubscription"


def dead_letter_source(attributes: Any) -> str:
    """Who put a message on the dead-letter topic: the function deployment that refused it, or Pub/Sub."""
    if PUBSUB_FORWARDED in attributes:
        return f"pubsub ({attributes[PUBSUB_FORWARDED]})"
    return attributes.get("deployment") or "unknown"


class DeadLetters:
    """Counts the dead-letter topic's messages through the watch's own subscription, per source (the
    function deployment that refused the ride, or Pub/Sub after its last attempt), keeping the latest reasons."""

    def __init__(self, emulator_host: str):
        from devstack.pubsub import subscriber_client

        self._subscriber = subscriber_client(emulator_host)
        self._path = self._subscriber.subscription_path(PROJECT, SUBSCRIPTIONS["dead_watch"])
        self.count = 0
        self.by_source: Counter[str] = Counter()
        self.reasons: deque[str] = deque(maxlen=5)

    def poll(self) -> None:
        from google.api_core import exceptions

        try:
            response = self._subscriber.pull(subscription=self._path, max_messages=100, timeout=0.5)
        except (exceptions.DeadlineExceeded, exceptions.RetryError):
            return
        if not response.received_messages:
            return
        self._subscriber.acknowledge(subscription=self._path, ack_ids=[m.ack_id for m in response.received_messages])
        for received in response.received_messages:
            attributes = received.message.attributes
            self.count += 1
            self.by_source[dead_letter_source(attributes)] += 1
            if PUBSUB_FORWARDED in attributes:  # the raw ride, as it was published
                self.reasons.append(
                    f"undeliverable after {attributes.get('CloudPubSubDeadLetterSourceDeliveryCount', '?')} tries"
                )
                continue
            try:
                self.reasons.append(json.loads(received.message.data).get("reason", "?"))
            except ValueError:
                self.reasons.append(attributes.get("reason", "?"))


def collect(stack: Stack, dead_letters: DeadLetters, deployments: dict[str, Any]) -> Snapshot:
    snapshot = Snapshot()
    for url in stack.backend_urls:
        try:
            readiness = requests.get(f"{url}/readyz", timeout=5).json()
            snapshot.backends[url] = readiness
            snapshot.stream = snapshot.stream or readiness.get("stream")
            snapshot.quality = snapshot.quality or readiness.get("live_quality")
        except (requests.RequestException, ValueError) as exc:
            snapshot.backends[url] = f"{type(exc).__name__}"
    dead_letters.poll()
    snapshot.dead_letters, snapshot.dead_letter_reasons = dead_letters.count, list(dead_letters.reasons)
    snapshot.dead_letters_by_source = dict(dead_letters.by_source)
    if "rollout" in stack.urls:
        try:
            snapshot.controller = (
                requests.get(f"{stack.urls['rollout']}/readyz", headers=stack.rollout_operator_headers(), timeout=5)
                .json()
                .get("aliases", {})
            )
        except (requests.RequestException, ValueError) as exc:
            snapshot.controller = {"-": {"last_error": f"the rollout service does not answer: {type(exc).__name__}"}}
    for alias, rollout in deployments.items():
        try:
            snapshot.deployments[alias] = rollout.status()
        except Exception as exc:  # the registry may be down: say so, keep watching
            snapshot.deployments[alias] = {"problem": f"{type(exc).__name__}: {exc}"}
    return snapshot


def _figure(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def quality_table(quality: dict[str, Any] | None) -> Table:
    """Each answering model (coarse, final v<N>, shadow v<N>) on the rides whose actual duration came back."""
    quality = quality or {}
    minutes = round(float(quality.get("window_seconds", 0)) / 60)
    table = Table(title=f"live quality (completed rides, last {minutes} min)", show_header=True)
    for column in ("model", "rides", "RMSE", "MAE", "bias", "within range", "range width"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model, figures in (quality.get("models") or {}).items():
        ranged = (f"{figures['coverage']:.0%}", f"{figures['mean_width']:.1f} min") if "coverage" in figures else ("-", "-")
        table.add_row(model, str(figures["rides"]), *(f"{figures[k]:.2f} min" for k in ("rmse", "mae", "bias")), *ranged)
    return table


def render(snapshot: Snapshot) -> Group:
    stream = snapshot.stream or {}
    traffic = Table(title="stream (all replicas, last minute)", show_header=True, expand=False)
    for column in ("rides/s", "p50 latency", "p95 latency", "pending rides", "dead letters"):
        traffic.add_column(column, justify="right")
    traffic.add_row(
        _figure(stream.get("finals_per_second")),
        _figure(stream.get("latency_ms_p50"), " ms"),
        _figure(stream.get("latency_ms_p95"), " ms"),
        _figure(stream.get("pending_rides")),
        str(snapshot.dead_letters),
    )
    models = Table(title="models", show_header=True)
    for column in ("deployment", "serves", "registry says", ""):
        models.add_column(column)
    for alias, entry in snapshot.deployments.items():
        serving, wanted = entry.get("serving") or {}, entry.get("registry") or {}
        flag = Text("ok", style="green") if entry.get("in_sync") else Text("MISMATCH", style="bold red")
        models.add_row(
            f"{alias} ({'function' if alias == 'production' else alias})",
            f"v{serving['version']}" if serving else "nothing",
            f"{alias} = v{wanted['version']}" if wanted else f"no {alias} alias",
            flag if (serving or wanted) else Text("-"),
        )
    replicas = Table(title="backend replicas", show_header=True)
    for column in ("replica", "health", "results", "refused", "answered by"):
        replicas.add_column(column)
    degraded: list[str] = []
    for url, readiness in snapshot.backends.items():
        if isinstance(readiness, str):
            replicas.add_row(url, Text(readiness, style="red"), "-", "-", "-")
            continue
        served = readiness.get("model_served") or {}
        health = readiness.get("status") or ("ok" if readiness.get("ready") else "down")
        degraded += readiness.get("degraded") or []
        replicas.add_row(
            url,
            Text(health, style={"ok": "green", "degraded": "bold yellow"}.get(health, "bold red")),
            str(readiness.get("results_received", "-")),
            str(readiness.get("results_refused", "-")),
            f"v{served['model_version']}" if served else "-",
        )
    parts: list[Any] = [traffic, quality_table(snapshot.quality), models, replicas]
    for alias, entry in snapshot.controller.items():
        if line := describe_phase(alias, entry):
            parts.append(Text(line, style="bold cyan" if line.startswith("ROLLING") else "bold red"))
    for reason in dict.fromkeys(degraded):  # the shared figures: every replica says the same
        parts.append(Text(f"DEGRADED: {reason}", style="bold yellow"))
    if snapshot.dead_letters_by_source:
        sources = ", ".join(f"{source} {count}" for source, count in sorted(snapshot.dead_letters_by_source.items()))
        parts.append(Text(f"dead letters by source: {sources}"))
    if snapshot.dead_letter_reasons:
        parts.append(Text("latest dead letters: " + " | ".join(r[:60] for r in snapshot.dead_letter_reasons)))
    return Group(*parts)


def watch(
    stack: Stack,
    console: Console,
    seconds: float | None = None,
    deployments: dict[str, Any] | None = None,
    frames: int | None = None,
) -> int:
    """Refresh the view every second, for ``seconds`` or ``frames`` refreshes, whichever comes first (neither:
    until Ctrl-C). Returns the number of refreshes."""
    from devstack.rollout_target import local_rollouts

    deployments = deployments if deployments is not None else local_rollouts(stack)
    dead_letters = DeadLetters(f"127.0.0.1:{stack.ports['pubsub']}")
    refreshes = 0
    ends = None if seconds is None else time.monotonic() + seconds
    with Live(render(collect(stack, dead_letters, deployments)), console=console, auto_refresh=False) as live:
        try:
            while (ends is None or time.monotonic() < ends) and (frames is None or refreshes < frames):
                started = time.monotonic()
                live.update(render(collect(stack, dead_letters, deployments)), refresh=True)
                refreshes += 1
                time.sleep(max(0.0, REFRESH_SECONDS - (time.monotonic() - started)))
        except KeyboardInterrupt:
            pass
    return refreshes
