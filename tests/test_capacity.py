"""The capacity model's arithmetic on a small fixed input, worked by hand; and its deployment is infra/'s."""

from __future__ import annotations

import importlib.util
import shlex
import sys
import time
from collections import Counter
from dataclasses import replace

import pytest
from conftest import REDIS_URL, REPO
from dockerfile_parse import DockerfileParser
from test_infra import resources  # noqa: F401 - the parsed Terraform, as a fixture

from backend.settings import BackendSettings

_spec = importlib.util.spec_from_file_location("capacity", REPO / "benchmarks/capacity.py")
capacity = sys.modules["capacity"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(capacity)

MONTH = 30 * 24 * 3600
PER_RIDE = capacity.PerRide(
    function_cpu_ms=3.0,
    backend_request_cpu_ms=5.0,
    listener_cpu_ms=1.0,
    redis_commands=40.0,
    redis_network_bytes=9000,
    redis_memory_bytes=2000,
    record_ttl_seconds=3600.0,
    topic_bytes={"push": 200, "pull": 400, "outcomes": 500},
    topic_messages={"push": 1.0, "pull": 1.0, "outcomes": 1.0},
    log_bytes={"predictions": 400, "function": 50, "backend-0": 300},
    redis_cpu_ms=0.5,
)


def test_pubsub_bills_a_push_and_every_publish_at_least_1000_bytes_and_a_batched_pull_at_its_size():
    assert capacity.pubsub_billable_bytes(200, 2, batched_pull=False) == 1000 + 2 * 1000
    assert capacity.pubsub_billable_bytes(400, 2) == 1000 + 2 * 400
    assert capacity.pubsub_billable_bytes(1500, 1) == 1500 + 1500


# A small deployment worked by hand: 50 requests per instance, a 2 GB store alerting at 80 %.
SMALL = capacity.Deployment(backend_concurrency=50, memorystore_gb=2.0, memory_alert_ratio=0.8)


def test_the_model_at_100_rides_per_second_by_hand():
    model = capacity.capacity_model(PER_RIDE, 100, SMALL)
    # The function: production and the shadow are revisions that each score every ride, 3 ms each:
    # 0.3 vCPU busy per revision, at 60 % per 1-vCPU instance: one each, two billed.
    assert (model["function_instances_per_revision"], model["function_instances"]) == (1, 2)
    # The backend: 6 ms per ride is 0.6 vCPU, one instance at 60 %. But 100 riders' long polls held a
    # second each are 100 requests at once, at 60 % of 50 per instance: ceil(100 / 30) = 4 instances.
    assert model["backend_instances"] == 4
    # In a backlog each poll is held its whole 10 s wait: 1,000 at once, ceil(1000 / 30) = 34 of 10.
    assert model["backend_in_a_backlog"] == {"requests_held": 1000, "for_cpu": 1, "for_requests": 34, "instances": 34}
    assert model["redis_ops_per_second"] == 4000
    assert model["redis_thread_busy"] == pytest.approx(100 * 0.0005)  # 0.5 ms of Redis's one thread per ride
    assert model["redis_memory_gb"] == pytest.approx(100 * 3600 * 2000 / 1e9)  # 0.72 GB held at a 1 h TTL
    assert model["redis_memory_share_of_deployed"] == pytest.approx(0.72 / 2, abs=0.01)
    # Pub/Sub: push 1000 + 2 pushes of 1000; pull 1000 + 2 x 400; shadow as pull; outcomes 1000 + 1 x 500
    # (its other delivery is the Cloud Storage subscription's, 500 bytes priced apart, with no free tier).
    per_second = 100 * ((1000 + 2000) + (1000 + 800) * 2 + (1000 + 500))
    assert model["pubsub_tib_per_month"] == pytest.approx(per_second * MONTH / 2**40, abs=0.001)
    to_storage_tib = 100 * 500 * MONTH / 2**40
    assert model["pubsub_storage_subscription_tib_per_month"] == pytest.approx(to_storage_tib, abs=0.001)
    # Logs ingested: the function's 50 bytes besides its prediction line from each of the two scorers, the
    # backend's 300, and Cloud Run's request log entry for each of the 5 requests (3 to the backend, a
    # push to each scorer); the 400-byte prediction lines go to their bucket, not to the _Default one.
    logged_gib = 100 * (2 * 50 + 300 + 5 * 1000) * MONTH / 2**30
    assert model["logging_gib_per_month"] == pytest.approx(logged_gib, abs=0.1)
    predictions_gib = 100 * 2 * 400 * MONTH / 2**30
    assert model["prediction_log_gib_per_month"] == pytest.approx(predictions_gib, abs=0.1)
    kept = capacity.capacity_model(PER_RIDE, 100, replace(SMALL, prediction_logs_in_default_bucket=True))
    assert kept["logging_gib_per_month"] == pytest.approx(100 * (2 * 450 + 300 + 5000) * MONTH / 2**30, abs=0.1)
    # Files in Cloud Storage: the completed rides and the prediction lines.
    stored_gib = to_storage_tib * 1024 + predictions_gib
    assert model["storage_gib_added_per_month"] == pytest.approx(stored_gib, abs=0.1)
    costs = model["cost_usd_per_month"]
    assert costs["logging"] == pytest.approx((logged_gib - 50) * 0.50, abs=0.05)
    assert costs["pubsub"] == pytest.approx((per_second * MONTH / 2**40 - 10 / 1024) * 40, abs=0.05)
    assert costs["pubsub_storage_subscription"] == pytest.approx(to_storage_tib * 50, abs=0.05)
    assert costs["storage_month_of_files"] == pytest.approx(stored_gib * 0.020, abs=0.05)
    assert costs["function_cpu"] == pytest.approx((2 * MONTH - 180_000) * 0.000024, abs=0.01)  # two instances all month
    assert costs["function_requests"] == pytest.approx((100 * MONTH * 2 / 1e6 - 2) * 0.40, abs=0.01)
    assert costs["backend_cpu"] == pytest.approx(4 * MONTH * 0.000018, abs=0.01)
    assert costs["memorystore"] == pytest.approx(2 * 720 * 0.064, abs=0.01)  # the deployed 2 GB, all month
    # A price that could not be read is never guessed: it is named, and left out of the total.
    assert model["unpriced"] == ["backend_memory"]
    assert model["priced_total_usd_per_month"] == pytest.approx(sum(costs.values()), abs=0.01)
    rides_in_millions = 100 * MONTH / 1e6
    assert model["priced_usd_per_million_rides"] == pytest.approx(
        model["priced_total_usd_per_month"] / rides_in_millions, abs=0.01
    )


def test_a_store_too_small_for_the_rate_is_billed_at_the_size_it_needs():
    # 1,000 rides/s x 3,600 s x 2,000 bytes = 7.2 GB held: 9 GB keeps it below the 80 % alert.
    model = capacity.capacity_model(PER_RIDE, 1000, SMALL)
    assert model["memorystore_gb_billed"] == 9
    assert model["cost_usd_per_month"]["memorystore"] == pytest.approx(9 * 720 * 0.064, abs=0.01)


def test_the_limits_come_nearest_first_and_a_broken_one_says_what_to_do():
    model = capacity.capacity_model(PER_RIDE, 10_000, SMALL)
    shares = [limit["share"] for limit in model["limits"]]
    assert shares == sorted(shares, reverse=True)
    # 10,000 rides/s: 100,000 long polls held 10 s in a backlog, at 30 per instance: 3,334 instances
    # against a maximum of 10 (CPU alone would want 100), the first to break.
    assert model["limits"][0] == {
        "limit": "backend instances in a backlog: 3334 of max_instance_count 10 (requests held: 100,000 long polls "
        "held 10 s at concurrency 50; CPU 100)",
        "share": 333.4,
        "fix": "raise max_instance_count, or threads with max_instance_request_concurrency together",
    }
    assert model["first_bottleneck"] == model["limits"][0]["limit"]
    # Redis memory against the 1.6 GB at which the 2 GB store's alert fires: 72 GB is 45 times it.
    memory = next(limit for limit in model["limits"] if limit["limit"].startswith("redis memory"))
    assert memory["share"] == pytest.approx(72 / 1.6, abs=0.01) and "memorystore_size_gb" in memory["fix"]
    quiet = capacity.capacity_model(PER_RIDE, 10, SMALL)["limits"]
    assert all(limit["share"] <= 1 and "fix" not in limit for limit in quiet)


def test_the_result_store_after_a_while_and_where_its_alert_fires_by_hand():
    # An hour in, at a 1 h TTL: an hour of rides; a day in, still an hour's (the records expire).
    assert capacity.redis_memory_gb(PER_RIDE, 10, seconds=1800) == pytest.approx(10 * 1800 * 2000 / 1e9)
    assert capacity.redis_memory_gb(PER_RIDE, 10) == pytest.approx(10 * 3600 * 2000 / 1e9)
    # The 2 GB store alerts at 1.6 GB: 1.6e9 / (3,600 s x 2,000 bytes) = 222.2 rides/s.
    assert capacity.memory_alert_rate(PER_RIDE, SMALL) == pytest.approx(1.6e9 / (3600 * 2000))


def test_an_idle_month_prices_what_stays_on_and_names_what_it_cannot_price():
    idle = capacity.idle_cost(SMALL)
    assert idle["cost_usd_per_month"] == {
        "backend_min_instance_cpu": round(MONTH * 0.000018, 2),
        "controller_cpu": round(MONTH * 0.000018, 2),
        "memorystore": round(2 * 720 * 0.064, 2),
        "cloud_sql": round(720 * 0.035, 2),
    }
    assert set(idle["unpriced"]) == {"backend_min_instance_memory", "controller_memory"}


def test_the_default_result_store_holds_a_day_at_the_default_maximum_rate(monkeypatch):
    """By the model's own per-ride figures: a day at the claimed rate stays below the deployed store's
    memory alert (infra/variables.tf's default and infra/capacity.tf's threshold, parsed)."""
    deployment = capacity.Deployment()
    per_ride = capacity.MEASURED_PER_RIDE
    monkeypatch.delenv("RESULT_TTL_SECONDS", raising=False)
    assert per_ride.record_ttl_seconds == BackendSettings.from_env().result_ttl_seconds
    held = capacity.redis_memory_gb(per_ride, capacity.DEFAULT_MAX_RIDES_PER_SECOND, seconds=86_400)
    assert held <= deployment.memorystore_gb * deployment.memory_alert_ratio
    assert capacity.memory_alert_rate(per_ride, deployment) > capacity.DEFAULT_MAX_RIDES_PER_SECOND
    assert capacity.defaults_at_the_claimed_rate(per_ride, deployment)["holds"] is True
    # The old default, 1 GB, fills in under an hour and a half at the claimed rate.
    assert capacity.defaults_at_the_claimed_rate(per_ride, replace(deployment, memorystore_gb=1))["holds"] is False
    # A record still lives through the longest ride and an outcome reported late.
    assert per_ride.record_ttl_seconds >= 60 * 60 + 2 * 3600


def test_cloud_run_sends_an_instance_no_more_requests_than_it_has_threads(resources):  # noqa: F811
    image = DockerfileParser(path=str(REPO / "backend/Dockerfile"))
    args = shlex.split(image.envs["GUNICORN_CMD_ARGS"])
    threads, workers = int(args[args.index("--threads") + 1]), int(image.envs["WEB_CONCURRENCY"])
    assert args[args.index("--worker-class") + 1] == "gthread"
    # The command sets neither (a flag there would override the environment's, locally too).
    assert "--threads" not in image.cmd and "--workers" not in image.cmd
    backend = resources["google_cloud_run_v2_service"]["backend"]["template"][0]
    assert backend["max_instance_request_concurrency"] == threads * workers == capacity.Deployment().backend_concurrency
    # Enough for the claimed rate's backlog within the maximum instances.
    backlog = capacity.backend_instances(
        capacity.MEASURED_PER_RIDE, capacity.DEFAULT_MAX_RIDES_PER_SECOND, capacity.Deployment(), 10.0
    )
    assert backlog["instances"] <= capacity.Deployment().backend_max_instances


def test_every_price_names_its_page_and_the_day_it_was_read():
    for name, price in capacity.PRICES.items():
        assert price["source"].startswith("https://") and price["read"], name
        assert price["usd"] is None or price["usd"] > 0, name


def test_the_modelled_deployment_is_the_one_infra_deploys(resources, monkeypatch):  # noqa: F811
    deployment = capacity.Deployment()
    # A long poll in a backlog is held the backend's longest wait.
    monkeypatch.delenv("MAX_WAIT_SECONDS", raising=False)
    assert deployment.backlog_hold_seconds == BackendSettings.from_env().max_wait_seconds
    function = resources["google_cloud_run_v2_service"]["predict"]["template"][0]
    limits = function["containers"][0]["resources"][0]["limits"]
    assert float(limits["cpu"]) == deployment.function_cpu
    assert limits["memory"] == f"{deployment.function_memory_gib:g}Gi"
    assert function["scaling"][0]["max_instance_count"] == deployment.function_max_instances
    assert function["max_instance_request_concurrency"] == deployment.function_concurrency
    backend = resources["google_cloud_run_v2_service"]["backend"]["template"][0]
    assert backend["scaling"][0]["min_instance_count"] == deployment.backend_min_instances
    assert "? 10 : 1" in backend["scaling"][0]["max_instance_count"] and deployment.backend_max_instances == 10
    limits = backend["containers"][0]["resources"][0]["limits"]
    assert float(limits["cpu"]) == deployment.backend_cpu and limits["memory"] == "512Mi"
    # One delivery per subscription of each topic (the rollout controller's copies included).
    subscriptions = resources["google_pubsub_subscription"]
    topics = Counter()
    for subscription in subscriptions.values():
        # The controller's copies: one subscription per topic of its for_each map.
        for topic in subscription.get("for_each", {}).values() if "for_each" in subscription else [subscription["topic"]]:
            topics[topic.split(".")[1]] += 1
    assert {topic: topics[topic] for topic in deployment.deliveries} == deployment.deliveries
    to_storage = Counter(s["topic"].split(".")[1] for s in subscriptions.values() if "cloud_storage_config" in s)
    assert dict(to_storage) == deployment.storage_deliveries
    # No minimum for the function; the prediction lines are kept off the _Default bucket unless asked.
    assert "min_instance_count" not in function["scaling"][0] and deployment.function_min_instances == 0
    exclusion = resources["google_logging_project_exclusion"]["predictions_in_bucket_only"]
    assert exclusion["count"] == "${var.prediction_logs_in_default_bucket ? 0 : 1}"
    assert deployment.prediction_logs_in_default_bucket is False


# A service whose ride costs 100 ms of CPU: 10 rides/s per 1-vCPU instance, 6 at the autoscaler's 60 %.
SLOW = capacity.ScaledService("slow", cpu_ms_per_ride=100, cpu=1.0, start_seconds=2.0, min_instances=1, max_instances=3)


def test_a_step_seen_at_once_by_hand():
    run = capacity.simulate_step(SLOW, before=1, after=15, on_demand=True, seconds=10, dt=0.01)
    # 15 rides/s is 1.5 vCPU: 3 instances at 60 %. One serves 10 rides/s until the two asked for at t=0 start at t=2.
    assert (run["instances_before"], run["instances_needed"], run["scaled_out_after_seconds"]) == (1, 3, 2.0)
    # The backlog grows 5 rides/s to 10 at t=2, then 30 rides/s serve 15 rides/s of arrivals: gone 2/3 s later.
    assert run["max_backlog_rides"] == 10
    assert run["backlog_drained_after_seconds"] == pytest.approx(2 + 10 / 15, abs=0.05)  # printed to 0.1 s
    # The ride in at t is out when 15t rides are: at 1.5t up to t=4/3, then at 2 + (15t - 20)/30.
    # Its wait, 0.5t then 4/3 - 0.5t, peaks at 2/3 s; those over 1/2 s came in between t=1 and t=5/3.
    assert run["max_wait_seconds"] == pytest.approx(2 / 3, abs=0.05)
    assert run["_rides_waiting_over"](0.5) == pytest.approx(15 * 2 / 3, abs=0.5)
    assert run["rides_refused"] == 0 and run["capped_at_max_instances"] is False


def test_a_request_queue_refuses_what_waits_longer_than_it_holds_by_hand():
    capped = capacity.ScaledService("capped", cpu_ms_per_ride=100, cpu=1.0, start_seconds=5.0, min_instances=1, max_instances=2)
    run = capacity.simulate_step(capped, before=1, after=15, on_demand=True, queue_seconds=1.0, seconds=20, dt=0.01)
    # 3 wanted, 2 allowed. Until t=5 one instance serves 10 of 15 rides/s: from t=3 the oldest waiting has
    # waited 1 s, so 5 rides/s are refused until the second instance serves, at t=5.
    assert run["capped_at_max_instances"] is True and run["scaled_out_after_seconds"] == 5.0
    assert run["rides_refused"] == pytest.approx(10, abs=1)
    assert run["max_wait_seconds"] == pytest.approx(1.0, abs=0.02)
    assert run["keeps_up"] is True and run["rides_still_waiting_at_the_end"] == 0
    # One instance at most: 10 of 15 rides/s, for good. From t=3 the oldest waiting is 1 s old: each
    # second 10 are served at 1 s and 5 refused, and the last second's 15 are still waiting at t=20.
    alone = capacity.ScaledService("alone", cpu_ms_per_ride=100, cpu=1.0, start_seconds=5.0, min_instances=1, max_instances=1)
    run = capacity.simulate_step(alone, before=1, after=15, on_demand=True, queue_seconds=1.0, seconds=20, dt=0.01)
    assert (run["keeps_up"], run["most_rides_per_second"], run["backlog_drained_after_seconds"]) == (False, 10, None)
    assert run["rides_refused"] == pytest.approx(5 * 17, abs=1)
    assert run["rides_still_waiting_at_the_end"] == pytest.approx(15, abs=1)


def test_a_step_seen_through_the_one_minute_cpu_average_is_slower():
    at_once = capacity.simulate_step(SLOW, before=1, after=15, on_demand=True, seconds=300)
    averaged = capacity.simulate_step(SLOW, before=1, after=15, on_demand=False, seconds=300)
    # At t=0 the minute's average is the old 0.1 vCPU: one instance. It takes the busy instance's 1 vCPU
    # in the average for 36 s (0.6 vCPU over 60 s) before a second is asked for.
    assert averaged["scaled_out_after_seconds"] > 36 + SLOW.start_seconds
    assert averaged["max_backlog_rides"] > 5 * 36 > at_once["max_backlog_rides"]
    assert averaged["max_wait_seconds"] > at_once["max_wait_seconds"]
    # Within the old rate's capacity nothing starts and nobody waits.
    steady = capacity.simulate_step(SLOW, before=1, after=5, on_demand=False, seconds=120)
    assert (steady["scaled_out_after_seconds"], steady["max_backlog_rides"], steady["max_wait_seconds"]) == (0.0, 0, 0.0)


def test_the_burst_holds_rides_for_the_function_and_refuses_posts_the_backend_cannot_take():
    starts = capacity.Starts(function_seconds=3.0, backend_seconds=2.0)
    result = capacity.burst(PER_RIDE, starts, resend_after=30, final_bound=150)
    runs = {(run["service"], run["autoscaler"].startswith("on-demand")): run for run in result["runs"]}
    assert set(runs) == {("function", True), ("function", False), ("backend", True), ("backend", False)}
    for service in ("function", "backend"):
        assert runs[service, True]["max_wait_seconds"] <= runs[service, False]["max_wait_seconds"]
    # Riders' rides wait in the push subscription (none refused), their POSTs at most Cloud Run's 10 s.
    assert runs["function", False]["rides_refused"] == 0
    assert runs["backend", False]["max_wait_seconds"] <= capacity.REQUEST_QUEUE_SECONDS
    late = runs["function", False]
    assert late["max_wait_seconds"] > 30 and late["rides_resent"] > late["rides_failed"]
    # 1,000 rides/s x 3 ms is 3 vCPU: 5 function instances at 60 %; 6 ms on the backend: 10 of its 10.
    assert runs["function", True]["instances_needed"] == 5 and runs["backend", True]["instances_needed"] == 10
    assert not any(key.startswith("_") for run in result["runs"] for key in run)


def test_every_thread_of_the_serving_model_can_hold_a_long_poll_on_redis(redis_prefix, monkeypatch):
    """As many long polls at once as an instance has threads, on a real Redis, with the backend's
    connection limit: each holds a subscription of its own. redis-py's default pool (100) refused the
    51st; the benchmark found it."""
    from concurrent.futures import ThreadPoolExecutor

    from backend.results import RedisResultStore

    monkeypatch.delenv("REDIS_MAX_CONNECTIONS", raising=False)
    settings, threads = BackendSettings.from_env(), capacity.deployed()["backend_threads"]
    store = RedisResultStore(REDIS_URL, 60, redis_prefix, max_connections=settings.redis_max_connections)
    for index in range(threads):
        store.create(f"r{index}", {"ride_id": f"r{index}", "status": "pending"}, resend_at=time.time() + 60)
    with ThreadPoolExecutor(threads) as pool:
        waited = list(pool.map(lambda index: store.wait(f"r{index}", 2.0), range(threads)))
    assert [record["status"] for record in waited] == ["pending"] * threads  # each waited, none refused
