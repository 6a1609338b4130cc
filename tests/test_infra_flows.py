"""The flows on Google Cloud (infra/flows.tf, infra/observability.tf): three Cloud Run jobs from one image,
started by Cloud Scheduler with exactly the right to run them, an alert on the line the live-quality job really
logs, and a dashboard whose every metric exists."""

from __future__ import annotations

import io
import logging
import re

import hcl2
import pytest
import yaml
from conftest import REPO
from test_infra import log_filter_matches

from devstack.access.grants import clean_hcl, load_resources

INFRA = REPO / "infra"
JOBS = {"training": "training", "monitoring": "monitoring", "live_quality": "live-quality"}  # Terraform key -> argument


@pytest.fixture(scope="module")
def resources() -> dict[str, dict[str, dict]]:
    return load_resources(INFRA)


def _blocks(name: str, kind: str) -> dict:
    with open(INFRA / name) as f:
        return {key: value for block in clean_hcl(hcl2.load(f)).get(kind, []) for key, value in block.items()}


def _resolve_names(text: str) -> str:
    """The live-quality job's name as Terraform makes it for env = "prod" (its key, the prefix of main.tf)."""
    prefix = _blocks("main.tf", "locals")["prefix"].replace("${var.env}", "prod")
    assert _blocks("observability.tf", "locals")["live_quality_job"] == '${google_cloud_run_v2_job.flows["live_quality"].name}'
    assert load_resources(INFRA)["google_cloud_run_v2_job"]["flows"]["name"] == '${local.prefix}-${replace(each.key, "_", "-")}'
    return text.replace("${local.live_quality_job}", f"{prefix}-live-quality")


def test_each_flow_is_a_cloud_run_job_of_the_flows_image_run_as_training_with_its_limits(resources):
    from flows.job import JOBS as ARGUMENTS

    flows = resources["google_cloud_run_v2_job"]["flows"]
    specs = flows["for_each"]
    assert set(resources["google_cloud_run_v2_job"]) == {"flows"}
    assert {key: spec["argument"] for key, spec in specs.items()} == JOBS and sorted(JOBS.values()) == sorted(ARGUMENTS)
    task = flows["template"][0]["template"][0]
    [container] = task["containers"]
    assert container["image"] == "${var.flows_image}" and container["args"] == ["${each.value.argument}"]
    assert task["service_account"] == "${google_service_account.training.email}"
    assert (task["timeout"], task["max_retries"]) == ("${each.value.timeout}", "${each.value.max_retries}")
    assert container["resources"][0]["limits"] == {"cpu": "${each.value.cpu}", "memory": "${each.value.memory}"}
    for key, spec in specs.items():
        assert re.fullmatch(r"\d+s", spec["timeout"]) and int(spec["timeout"][:-1]) <= 1800, key  # inside the token's hour
        assert spec["max_retries"] in (0, 1) and int(spec["memory"].removesuffix("Gi")) >= 2 and int(spec["cpu"]) >= 1, key
    # A degraded production exits 1: a retry would judge the same rides again and log the alert's line twice.
    assert specs["live_quality"]["max_retries"] == 0
    # Every job reaches the MLflow server with an ID token for its URL (run.invoker of the training identity).
    [dynamic] = container["dynamic"]
    assert dynamic["env"]["for_each"] == "${merge(local.flows_mlflow_env, each.value.env)}"
    mlflow_env = _blocks("flows.tf", "locals")["flows_mlflow_env"]
    assert (
        mlflow_env["MLFLOW_TRACKING_URI"] == mlflow_env["MLFLOW_ID_TOKEN_AUDIENCE"] == "${google_cloud_run_v2_service.mlflow.uri}"
    )


def test_the_jobs_environment_is_what_the_flows_read(resources, monkeypatch):
    """The names Terraform sets are the names flows.settings and training.settings read."""
    from flows.settings import JobSettings, MonitoringSettings
    from training.settings import Settings

    specs = resources["google_cloud_run_v2_job"]["flows"]["for_each"]
    assert set(specs["training"]["env"]) == {"TRAINING_TRIALS"}
    names = {**_blocks("flows.tf", "locals")["flows_mlflow_env"], **specs["monitoring"]["env"], **specs["live_quality"]["env"]}
    for name in names:
        monkeypatch.setenv(name, f"gs://set-as-{name.lower()}/")
    monkeypatch.setenv("TRAINING_TRIALS", "5")
    settings, monitoring, job = Settings.from_env(), MonitoringSettings.from_env(), JobSettings.from_env()
    assert (settings.tracking_uri, settings.data_base, settings.artifact_root) == (
        "gs://set-as-mlflow_tracking_uri/",
        "gs://set-as-trip_data_base/",
        "gs://set-as-mlflow_artifact_root/",
    )
    assert job.mlflow_id_token_audience == "gs://set-as-mlflow_id_token_audience/" and job.training_trials == 5
    assert monitoring.prediction_logs == "gs://set-as-prediction_logs/"
    assert monitoring.outcomes_uri == "gs://set-as-outcomes_uri/"


def test_the_scheduler_runs_each_job_through_the_admin_api_with_only_the_right_to_run_them(resources):
    scheduled = resources["google_cloud_scheduler_job"]["flows"]
    assert scheduled["for_each"] == "${google_cloud_run_v2_job.flows}"
    assert scheduled["schedule"] == "${var.flows_schedules[each.key]}" and scheduled["time_zone"] == "${var.flows_time_zone}"
    target = scheduled["http_target"][0]
    assert target["http_method"] == "POST"
    assert target["uri"] == (
        "https://run.googleapis.com/v2/projects/${var.project_id}/locations/${var.region}/jobs/${each.value.name}:run"
    )
    # An OAuth access token (Google APIs), not an OIDC token (which only Cloud Run services take).
    [oauth] = target["oauth_token"]
    assert oauth["service_account_email"] == "${google_service_account.scheduler.email}" and "oidc_token" not in target
    # roles/run.invoker holds run.jobs.run; granted on each job, nowhere else.
    grants = [
        body for kind, named in resources.items() if kind.endswith("_iam_member") for body in named.values()
        if body["member"] == "serviceAccount:${google_service_account.scheduler.email}"
    ]  # fmt: skip
    [grant] = grants
    assert (grant["role"], grant["name"], grant["for_each"]) == ("roles/run.invoker", "${each.value.name}", scheduled["for_each"])
    assert scheduled["depends_on"] == ["${google_cloud_run_v2_job_iam_member.scheduler_runs_flows}"]


def test_the_default_schedules_are_weekly_daily_and_hourly_in_the_taxis_time_zone():
    from flows.serve import HOURLY_LIVE_QUALITY, TIMEZONE

    variables = _blocks("variables.tf", "variable")
    assert variables["flows_image"].get("default") is None  # required: the image gcp-up builds
    assert variables["flows_time_zone"]["default"] == TIMEZONE
    schedules = variables["flows_schedules"]["default"]
    assert set(schedules) == set(JOBS)
    minute, hour, day, month, weekday = schedules["training"].split()
    assert minute.isdigit() and hour.isdigit() and day == month == "*" and weekday.isdigit()  # once a week
    minute, hour, day, month, weekday = schedules["monitoring"].split()
    assert minute.isdigit() and hour.isdigit() and day == month == weekday == "*"  # once a day
    assert schedules["live_quality"] == HOURLY_LIVE_QUALITY  # once an hour, as flows.serve


def _prefect_console_line(message: str) -> str:
    """What Prefect's console handler writes for a flow run's log record, with Prefect's own formatter settings."""
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH
    from prefect.logging.formatters import PrefectFormatter
    from prefect.logging.handlers import PrefectConsoleHandler

    settings = yaml.safe_load(DEFAULT_LOGGING_SETTINGS_PATH.read_text())
    standard = {k: v for k, v in settings["formatters"]["standard"].items() if k != "()"}
    stream = io.StringIO()
    handler = PrefectConsoleHandler(stream=stream)
    handler.setFormatter(PrefectFormatter(**standard))
    record = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "%s: %s", tuple(message.split(": ", 1)), None)
    record.flow_run_name, record.flow_run_id = "spectral-jackal", "0f1e"
    handler.emit(record)
    return stream.getvalue()


def _job_entry(job: str, payload: dict) -> dict:
    return {
        "resource": {
            "type": "cloud_run_job",
            "labels": {"job_name": job, "location": "europe-west1", "project_id": "ridestream-prod"},
        },
        "labels": {"run.googleapis.com/execution_name": f"{job}-x7k2p", "run.googleapis.com/task_index": "0"},
        "logName": "projects/ridestream-prod/logs/run.googleapis.com%2Fstderr",
        **payload,
    }


def test_the_degradation_alert_matches_the_line_the_live_quality_job_writes(resources):
    from flows.live_quality_flow import DEGRADED

    problem = (
        f"{DEGRADED}: final v3: live RMSE 7.412 min over 412 completed rides (the window from 2026-12-07 05:00 UTC) "
        "is above its test RMSE 5.010 by more than 20% (limit 6.012)"
    )
    printed = _prefect_console_line(problem)
    assert printed.count("\n") == 1, printed  # one line, however long: one log entry on Cloud Run, not a wrapped few
    query = _resolve_names(_blocks("observability.tf", "locals")["live_quality_degraded_filter"].replace('\\"', '"'))
    entry = _job_entry("ridestream-prod-live-quality", {"textPayload": printed.rstrip("\n")})
    assert log_filter_matches(query, entry)
    assert not log_filter_matches(query, _job_entry("ridestream-prod-training", {"textPayload": printed}))
    assert not log_filter_matches(query, {**entry, "resource": {**entry["resource"], "type": "cloud_run_revision"}})
    healthy = _prefect_console_line("production v3 within bounds: fine")
    assert not log_filter_matches(query, _job_entry("ridestream-prod-live-quality", {"textPayload": healthy}))
    # The metric the dashboard charts counts the same lines.
    metric = resources["google_logging_metric"]["live_quality_degraded"]
    assert metric["filter"] == "${local.live_quality_degraded_filter}"


def test_the_alert_needs_no_metric_to_exist_and_tells_the_notification_channels(resources):
    """A threshold on a log-based metric created in the same apply is refused ("Cannot find metric(s)") until
    the metric has propagated; a log-match condition reads the log itself, so one apply creates the alert."""
    policies = resources["google_monitoring_alert_policy"]
    policy = policies["live_quality_degraded"]
    [condition] = policy["conditions"]
    assert set(condition) == {"display_name", "condition_matched_log"}
    assert condition["condition_matched_log"][0]["filter"] == "${local.live_quality_degraded_filter}"
    assert "logging.googleapis.com/user" not in str(policy)
    assert policy["alert_strategy"][0]["notification_rate_limit"][0]["period"]  # required with a log-match condition
    for name, body in policies.items():  # every alert tells whoever var.alert_notification_channels names
        assert body["notification_channels"] == "${var.alert_notification_channels}", name
    assert "make rollback" not in str(policy)  # the local stack's command; Google Cloud's is gcp-rollback


def test_the_live_quality_metrics_read_the_lines_the_job_writes(resources):
    from flows.job import quality_lines

    summary = {
        "complete_window_start": 1_780_000_000.0,
        "complete_window": {
            "final v3": {"rides": 412, "rmse": 5.3, "mae": 3.9, "bias": 0.4, "coverage": 0.79, "mean_width": 9.1, "ranged": 400},
            "shadow v4": {"rides": 398, "rmse": 4.9, "mae": 3.6, "bias": 0.1},
            "coarse": {"rides": 412, "rmse": 8.0, "mae": 6.0, "bias": 2.0},
        },
    }
    lines = quality_lines(summary)
    assert [(line["answer"], line["model_version"]) for line in lines] == [("final", "3"), ("shadow", "4")]
    metrics = resources["google_logging_metric"]
    local = _blocks("observability.tf", "locals")
    for name, field, expected in (("live_rmse", "rmse", [5.3, 4.9]), ("live_interval_coverage", "interval_coverage", [0.79])):
        metric = metrics[name]
        query = _resolve_names(metric["filter"].replace("${local.live_quality_line_filter}", local["live_quality_line_filter"]))
        query = query.replace('\\"', '"')
        matched = [
            line for line in lines if log_filter_matches(query, _job_entry("ridestream-prod-live-quality", {"jsonPayload": line}))
        ]
        assert metric["value_extractor"] == f"EXTRACT(jsonPayload.{field})"
        assert [line[field] for line in matched] == expected
        assert metric["label_extractors"] == "${local.live_quality_labels}"
        [labels] = metric["metric_descriptor"][0]["dynamic"]
        assert labels["labels"]["for_each"] == "${local.live_quality_labels}"
        for key, extractor in local["live_quality_labels"].items():
            assert all(line[extractor.removeprefix("EXTRACT(jsonPayload.").removesuffix(")")] for line in matched), key


# Google's built-in metric types the dashboard charts, as Google's metric list spells them
# (cloud.google.com/monitoring/api/metrics_gcp_p_z: pubsub, redis; dead_letter_message_count also on Pub/Sub's
# dead-letter page, usage_ratio on Memorystore's metrics page). A new one is added here only after that check.
BUILT_IN_METRICS = {
    "pubsub.googleapis.com/topic/send_message_operation_count",
    "pubsub.googleapis.com/subscription/push_request_latencies",
    "pubsub.googleapis.com/subscription/oldest_unacked_message_age",
    "pubsub.googleapis.com/subscription/num_undelivered_messages",
    "pubsub.googleapis.com/subscription/dead_letter_message_count",
    "redis.googleapis.com/stats/memory/usage_ratio",
}


def test_the_dashboard_charts_what_an_operator_watches_from_metrics_that_exist(resources):
    text = (INFRA / "observability.tf").read_text()
    charts = _blocks("observability.tf", "locals")["dashboard_charts"]
    titles = " | ".join(chart["title"] for chart in charts).lower()
    for watched in (
        "rides/s",
        "time to the final answer",
        "dead letters",
        "pending rides",
        "redis memory",
        "live rmse",
        "coverage",
    ):
        assert watched in titles, watched
    referenced = set(re.findall(r'metric\.type=\\"([^\\"]+)\\"', text))
    user = {m for m in referenced if m.startswith("${local.user_metric}/")}
    assert referenced - user == BUILT_IN_METRICS
    defined = {f"${{local.user_metric}}/${{google_logging_metric.{name}.name}}" for name in resources["google_logging_metric"]}
    assert user <= defined and len(user) == 3
    # What each chart is about: the push topic, the function's push subscription, the dead letters, the store.
    for reference in (
        "google_pubsub_topic.push.name",
        "google_pubsub_subscription.function_push.name",
        "google_pubsub_subscription.deadletter_inspect.name",
        "${local.prefix}-results",
    ):
        assert reference in text, reference
    dashboard = resources["google_monitoring_dashboard"]["operations"]
    assert dashboard["dashboard_json"].startswith("${jsonencode(")
    assert "local.dashboard_charts" in dashboard["dashboard_json"]


def test_the_jobs_output_names_each_flows_job():
    outputs = _blocks("outputs.tf", "output")
    assert outputs["jobs"]["value"] == "${{for key, job in google_cloud_run_v2_job.flows : key => job.name}}"


def test_the_variable_checks_refuse_schedules_and_trip_data_that_would_fail_later(tmp_path):
    """Terraform itself (offline, no provider) evaluates each validation on good and bad values."""
    import json
    import subprocess

    variables = _blocks("variables.tf", "variable")
    cases = {
        "flows_schedules": [
            ({"training": "0 6 * * 1", "monitoring": "0 7 * * *", "live_quality": "5 * * * *"}, True),
            ({"training": "0 6 * * 1", "monitoring": "0 7 * * *"}, False),  # a job without a schedule
            ({"training": "0 6 * * 1", "monitoring": "0 7 * * *", "live_quality": "5 * * * * *"}, False),  # six fields
        ],
        "trip_data": [("", True), ("gs://p-ridestream-prod-models/trip-data", True), ("https://example.org/trip-data", False)],
    }
    expressions, expected = [], []
    for name, values in cases.items():
        conditions = [validation["condition"] for validation in variables[name]["validation"]]
        for value, accepted in values:
            literal = json.dumps(value)
            checks = [c.removeprefix("${").removesuffix("}").replace(f"var.{name}", f"({literal})") for c in conditions]
            expressions.append("alltrue([" + ", ".join(checks) + "])")
            expected.append(accepted)
    answers = []
    for expression in expressions:  # one console each: piped several lines, it prints only the last result
        console = subprocess.run(
            ["terraform", "console"], input=expression + "\n", capture_output=True, text=True, cwd=tmp_path, timeout=60
        )
        assert console.returncode == 0, console.stderr
        answers.append(console.stdout.split()[-1] == "true")
    assert answers == expected
