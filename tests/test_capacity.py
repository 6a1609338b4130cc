"""The capacity model's arithmetic on a small fixed input, worked by hand; and its deployment is infra/'s."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections import Counter

import pytest
from conftest import REPO
from test_infra import resources  # noqa: F401 - the parsed Terraform, as a fixture

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
    log_bytes={"function": 400, "backend-0": 300},
    redis_cpu_ms=0.5,
)


def test_pubsub_bills_a_push_and_every_publish_at_least_1000_bytes_and_a_batched_pull_at_its_size():
    assert capacity.pubsub_billable_bytes(200, 2, batched_pull=False) == 1000 + 2 * 1000
    assert capacity.pubsub_billable_bytes(400, 2) == 1000 + 2 * 400
    assert capacity.pubsub_billable_bytes(1500, 1) == 1500 + 1500


def test_the_model_at_100_rides_per_second_by_hand():
    model = capacity.capacity_model(PER_RIDE, 100)
    # The function: production and the shadow score every ride, 3 ms each: 0.6 vCPU busy, at 60 % per 1-vCPU instance.
    assert model["function_instances"] == math.ceil(100 * 0.003 * 2 / 0.6) == 1
    # The backend: 6 ms per ride, 0.6 vCPU busy: one instance (its minimum).
    assert model["backend_instances"] == 1
    assert model["redis_ops_per_second"] == 4000
    assert model["redis_thread_busy"] == pytest.approx(100 * 0.0005)  # 0.5 ms of Redis's one thread per ride
    assert model["redis_memory_gb"] == pytest.approx(100 * 3600 * 2000 / 1e9)  # 0.72 GB held at a 1 h TTL
    # Pub/Sub: push 1000 + 2 pushes of 1000; pull 1000 + 2 x 400; shadow as pull; outcomes 1000 + 2 x 500.
    per_second = 100 * ((1000 + 2000) + (1000 + 800) * 2 + (1000 + 1000))
    assert model["pubsub_tib_per_month"] == pytest.approx(per_second * MONTH / 2**40, abs=0.001)
    # Logs: the function's 400 bytes from each of the two scorers, and the backend's 300.
    logged_gib = 100 * (2 * 400 + 300) * MONTH / 2**30
    assert model["logging_gib_per_month"] == pytest.approx(logged_gib, abs=0.1)
    costs = model["cost_usd_per_month"]
    assert costs["logging"] == pytest.approx((logged_gib - 50) * 0.50, abs=0.05)
    assert costs["pubsub"] == pytest.approx((per_second * MONTH / 2**40 - 10 / 1024) * 40, abs=0.05)
    assert costs["function_cpu"] == pytest.approx((MONTH - 180_000) * 0.000024, abs=0.01)  # one instance all month
    assert costs["function_requests"] == pytest.approx((100 * MONTH * 2 / 1e6 - 2) * 0.40, abs=0.01)
    assert costs["backend_cpu"] == pytest.approx(MONTH * 0.000018, abs=0.01)
    # A price that could not be read is never guessed: it is named, and left out of the total.
    assert set(model["unpriced"]) == {"backend_memory", "memorystore"}
    assert model["priced_total_usd_per_month"] == pytest.approx(sum(costs.values()), abs=0.01)
    rides_in_millions = 100 * MONTH / 1e6
    assert model["priced_usd_per_million_rides"] == pytest.approx(
        model["priced_total_usd_per_month"] / rides_in_millions, abs=0.01
    )


def test_the_limits_come_nearest_first_and_a_broken_one_says_what_to_do():
    model = capacity.capacity_model(PER_RIDE, 10_000)
    shares = [limit["share"] for limit in model["limits"]]
    assert shares == sorted(shares, reverse=True)
    # 10,000 rides/s x 6 ms is 60 vCPU: 100 backend instances against a maximum of 10, the first to break.
    assert model["limits"][0] == {
        "limit": "backend instances: 100 of max_instance_count 10",
        "share": 10.0,
        "fix": "raise max_instance_count; fewer Redis round trips per ride cut the request path's CPU",
    }
    assert model["first_bottleneck"] == model["limits"][0]["limit"]
    quiet = capacity.capacity_model(PER_RIDE, 10)["limits"]
    assert all(limit["share"] <= 1 and "fix" not in limit for limit in quiet)


def test_an_idle_month_prices_what_stays_on_and_names_what_it_cannot_price():
    idle = capacity.idle_cost()
    assert idle["cost_usd_per_month"] == {
        "backend_min_instance_cpu": round(MONTH * 0.000018, 2),
        "controller_cpu": round(MONTH * 0.000018, 2),
    }
    assert set(idle["unpriced"]) == {"backend_min_instance_memory", "controller_memory", "memorystore_1_gb", "cloud_sql"}


def test_every_price_names_its_page_and_the_day_it_was_read():
    for name, price in capacity.PRICES.items():
        assert price["source"].startswith("https://") and price["read"], name
        assert price["usd"] is None or price["usd"] > 0, name


def test_the_modelled_deployment_is_the_one_infra_deploys(resources):  # noqa: F811
    deployment = capacity.Deployment()
    function = resources["google_cloudfunctions2_function"]["predict"]["service_config"][0]
    assert float(function["available_cpu"]) == deployment.function_cpu
    assert function["available_memory"] == f"{deployment.function_memory_gib:g}Gi"
    assert function["max_instance_count"] == deployment.function_max_instances
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
