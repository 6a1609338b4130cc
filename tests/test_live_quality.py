"""The outcomes topic reaching the monitoring flow's source: completed rides published on the Pub/Sub
emulator, filed into the emulated bucket as the Cloud Storage subscription files them, read by the
live-quality flow, which logs one point per window into the version's run and fails on degradation."""

from __future__ import annotations

import json
import threading
import time
import uuid

import numpy as np
import pytest
from conftest import unique
from google.cloud import pubsub_v1, storage

from devstack.outcome_sink import OutcomeSink
from devstack.pubsub import ensure_subscription, ensure_topic
from ride_contract.outcome import CompletedRide

pytestmark = pytest.mark.integration

RIDE = {"datetime": "2021-03-04T18:59:00", "PULocationID": 196, "DOLocationID": 28, "trip_distance": 2.5}


@pytest.fixture
def production(tmp_path, monkeypatch):
    """A registry whose production v1 has a test RMSE of 5.0 (a run and a version, no training needed)."""
    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("MODEL_NAME", "ride-duration")
    monkeypatch.setenv("LIVE_WINDOW_MINUTES", "60")
    monkeypatch.setenv("LIVE_WINDOW_SETTLE_MINUTES", "5")
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("ride-duration", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "test_rmse", 5.0)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("ride-duration")
    version = client.create_model_version("ride-duration", f"{run.info.artifact_uri}/model", run.info.run_id)
    client.set_registered_model_alias("ride-duration", "production", version.version)
    return client, run.info.run_id


def _completed(count: int, errors: np.ndarray, run_id: str, at: float) -> list[CompletedRide]:
    actual = np.linspace(8, 30, count).round(2)
    common = {"fingerprint": "f", "ride": RIDE, "requested_at": at - 600, "model_version": "1", "model_run_id": run_id}
    return [
        CompletedRide(
            ride_id=f"r{i}",
            duration_coarse=float(actual[i] + 3),
            duration_final=float(actual[i] + errors[i]),
            actual_minutes=float(actual[i]),
            outcome_at=at,
            **common,
        )
        for i in range(count)
    ]


def _filed(emulators, rides: list[CompletedRide]) -> str:
    """Publish the completed rides to an outcomes topic; the sink files them; the gs:// prefix they are under."""
    topic, prefix = unique("outcomes"), f"outcomes-{uuid.uuid4().hex[:8]}/"
    ensure_topic(emulators.project, topic)
    ensure_subscription(emulators.project, topic, topic + "-storage")
    sink = OutcomeSink(emulators.project, topic + "-storage", emulators.bucket, max_seconds=1, max_messages=1000, prefix=prefix)
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    publisher = pubsub_v1.PublisherClient()
    for ride in rides:
        publisher.publish(publisher.topic_path(emulators.project, topic), ride.to_message())
    deadline = time.monotonic() + 30
    while sink.filed["rides"] < len(rides) and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    thread.join(timeout=10)
    assert sink.filed["rides"] == len(rides), sink.filed
    blobs = list(storage.Client().list_blobs(emulators.bucket, prefix=prefix))
    assert blobs and all(b.name.endswith(".jsonl") for b in blobs)
    lines = [line for b in blobs for line in b.download_as_text().splitlines()]
    assert sorted(CompletedRide.model_validate_json(line).ride_id for line in lines) == sorted(r.ride_id for r in rides)
    return f"gs://{emulators.bucket}/{prefix}"


def test_completed_rides_reach_the_flow_which_logs_each_closed_window_once_beside_the_test_rmse(
    emulators, production, prefect_harness, monkeypatch
):
    """A window's point is logged once the window has closed (ended, and its rides filed): never on part of
    its rides. Each ride counts once, however often its completed ride was filed."""
    import flows.live_quality_flow as live

    client, run_id = production
    hour = (time.time() // 3600) * 3600
    now = hour + 1800  # the flow's clock: the last hour is closed, this one is still open
    monkeypatch.setattr(live, "_now", lambda: now)
    errors = np.random.default_rng(3).normal(0, 4, 50).round(2)
    closed = _completed(50, errors, run_id, hour - 1800)
    still_open = [
        ride.model_copy(update={"ride_id": f"open-{ride.ride_id}"})
        for ride in _completed(20, np.full(20, 9.0), run_id, hour + 60)
    ]
    # The first ride filed again (Pub/Sub delivers at least once), and a later, different outcome for it: not counted.
    repeats = [closed[0], closed[0].model_copy(update={"actual_minutes": 59.0, "outcome_at": hour - 1700})]
    uri = _filed(emulators, closed + still_open + repeats)
    summary = live.live_quality_flow(uri, hours=2)
    expected_rmse = round(float(np.sqrt(np.mean(np.array([r.duration_final - r.actual_minutes for r in closed]) ** 2))), 3)
    assert summary["completed_rides"] == 70 and summary["degraded"] is None, summary
    assert (summary["windows"], summary["points_logged"], summary["windows_still_open"]) == (2, 1, 1), summary
    assert summary["complete_window"]["final v1"] == pytest.approx(
        {"rides": 50, "rmse": expected_rmse, "mae": float(np.mean(np.abs([r.duration_final - r.actual_minutes for r in closed]))),
         "bias": float(np.mean([r.duration_final - r.actual_minutes for r in closed]))},
        abs=0.001,
    )  # fmt: skip
    assert summary["complete_window"]["coarse"]["bias"] == pytest.approx(3.0)
    assert summary["latest_window"]["final v1"]["rides"] == 20  # shown as it stands, not logged
    [point] = client.get_metric_history(run_id, "live_rmse")  # in the version's own run, beside test_rmse
    assert point.value == pytest.approx(expected_rmse) and point.step == int(hour // 3600) - 1
    assert point.timestamp == int(hour * 1000)  # the window's end
    assert live.live_quality_flow(uri, hours=2)["points_logged"] == 0  # run again: the closed window is not logged twice
    # The open hour ends; its point is logged by the first run once its rides are all filed, and not before.
    now = hour + 3600 + 60
    assert live.live_quality_flow(uri, hours=2)["points_logged"] == 0  # ended, but rides may still be filed
    now = hour + 3600 + 5 * 60
    assert live.live_quality_flow(uri, hours=2)["points_logged"] == 1
    history = sorted(client.get_metric_history(run_id, "live_rmse"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(point.step, point.value), (int(hour // 3600), pytest.approx(9.0))]


def test_a_production_model_worse_live_than_on_its_test_month_fails_the_flow(emulators, production, prefect_harness, monkeypatch):
    from prefect import get_client

    from flows.live_quality_flow import DEGRADED, QualityDegraded, live_quality_flow

    _, run_id = production
    monkeypatch.setenv("ALERT_MIN_RIDES", "30")
    at = (time.time() // 3600) * 3600 + 1
    uri = _filed(emulators, _completed(40, np.full(40, 7.0), run_id, at))  # 7 min off: RMSE 7 > 5.0 * 1.2
    with pytest.raises(QualityDegraded, match=r"final v1: live RMSE 7.000 min over 40 completed rides .*\(limit 6.000\)"):
        live_quality_flow(uri, hours=2)

    async def artifact():
        async with get_client() as prefect:
            return await prefect.read_latest_artifacts()

    import asyncio

    latest = {a.key: a for a in asyncio.run(artifact())}
    assert DEGRADED in latest["live-quality"].description
    # Too few rides to judge: not an alert.
    monkeypatch.setenv("ALERT_MIN_RIDES", "41")
    assert live_quality_flow(uri, hours=2)["degraded"] is None


def test_the_challenger_is_judged_on_the_completed_rides_and_its_page_says_so(emulators, production, prefect_harness):
    from flows.challenger_flow import challenger_flow
    from ride_contract.outcome import ShadowAnswer

    client, run_id = production
    challenger_run = client.create_run(client.get_run(run_id).info.experiment_id).info
    client.create_model_version("ride-duration", f"{challenger_run.artifact_uri}/model", challenger_run.run_id)
    client.set_registered_model_alias("ride-duration", "challenger", "2")
    rng = np.random.default_rng(9)
    at = time.time()
    rides = [
        ride.model_copy(update={"shadow": [ShadowAnswer(model_version="2", duration_final=ride.actual_minutes + e)]})
        for ride, e in zip(_completed(300, rng.normal(0, 5, 300), run_id, at), rng.normal(0, 2, 300), strict=True)
    ]  # the challenger (v2, in shadow) errs far less than production v1
    result = challenger_flow(outcomes=_filed(emulators, rides), hours=1)
    assert result["rides"] == 300 and result["challenger_better"] is True, result
    version = client.get_model_version("ride-duration", "2")
    assert version.tags["live_comparison"].startswith("v2 better: RMSE v2 - v1 -")
    assert json.loads(version.tags["live_rmse_diff_ci95"]) == result["rmse_diff_ci95"]
    assert "**Live, against v1**: v2 better" in version.description


def test_the_live_quality_job_fails_on_degradation_and_still_writes_each_versions_figures(
    emulators, production, prefect_harness, monkeypatch, capsys
):
    """flows.job as Cloud Run runs it: exit 1 (a failed execution), and one JSON line per version of the last
    complete hour on stdout, which the dashboard's log-based metrics read (infra/observability.tf)."""
    from flows import job

    _, run_id = production
    monkeypatch.setenv("ALERT_MIN_RIDES", "30")
    at = (time.time() // 3600) * 3600 - 1800  # in the last hour that has ended
    monkeypatch.setenv("OUTCOMES_URI", _filed(emulators, _completed(40, np.full(40, 7.0), run_id, at)))
    monkeypatch.setenv("LIVE_QUALITY_HOURS", "2")
    monkeypatch.delenv("MLFLOW_ID_TOKEN_AUDIENCE", raising=False)  # the local registry takes no token
    assert job.run("live-quality") == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    [figures] = [line for line in lines if line.get("message") == job.LIVE_QUALITY_LINE]
    assert (figures["answer"], figures["model_version"], figures["rides"]) == ("final", "1", 40)
    assert figures["rmse"] == pytest.approx(7.0) and figures["severity"] == "INFO"


def test_each_ride_counts_once_and_only_closed_windows_are_logged(tmp_path):
    """The flow's two rules on their own (no emulator): the first outcome of a ride_id is the one read, and a
    window is closed once it has ended and its rides have had time to be filed."""
    from flows.live_quality_flow import closed_windows, read_completed_rides, windowed

    first = _completed(3, np.zeros(3), "run", at=7200.0 + 100)
    later = first[0].model_copy(update={"actual_minutes": 59.0, "outcome_at": 7200.0 + 900})  # another, later
    (tmp_path / "a.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in [later, *first, first[1]]))
    rides, unreadable = read_completed_rides.fn(str(tmp_path), since=0)
    assert unreadable == 0 and sorted(r.ride_id for r in rides) == ["r0", "r1", "r2"]
    assert {r.ride_id: r.actual_minutes for r in rides}["r0"] == first[0].actual_minutes  # the first outcome, not the later
    windows = windowed(rides, 3600)
    assert list(windows) == [2] and windows[2]["final v1"]["rides"] == 3
    assert closed_windows(windows, 3600, 300, now=3 * 3600 + 299) == {}  # ended, not yet all filed
    assert closed_windows(windows, 3600, 300, now=3 * 3600 + 300) == windows
    assert closed_windows(windows, 3600, 0, now=3 * 3600 - 1) == {}  # still open
