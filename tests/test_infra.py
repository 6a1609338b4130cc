"""Terraform in infra/: it parses, creates what the system needs, and grants nothing broader than needed."""

from __future__ import annotations

import re
from collections import defaultdict

import hcl2
import pytest
from conftest import REPO

from devstack.access.grants import clean_hcl as _clean
from devstack.access.grants import load_resources

INFRA = REPO / "infra"
BOOTSTRAP = INFRA / "bootstrap"


def log_filter_matches(query: str, entry: dict) -> bool:
    """Cloud Logging's query language, the part infra/ uses: clauses joined by AND, each ``field="value"``
    (equal), ``field:"value"`` (has: a substring, case-insensitive) or ``field:*`` (present)."""
    import json

    for clause in query.split(" AND "):
        match = re.fullmatch(r'\s*([\w.]+)\s*(=|:)\s*(\*|".*")\s*', clause)
        assert match, f"not a clause this evaluator knows: {clause!r}"
        field, operator, value = match.groups()
        actual = entry
        for key in field.split("."):
            if not isinstance(actual, dict) or key not in actual:
                return False
            actual = actual[key]
        if value == "*":
            continue
        expected = json.loads(value)
        if operator == "=" and actual != expected:
            return False
        if operator == ":" and expected.lower() not in str(actual).lower():
            return False
    return True


@pytest.fixture(scope="module")
def resources() -> dict[str, dict[str, dict]]:
    return load_resources(INFRA)


@pytest.fixture(scope="module")
def bootstrap() -> dict[str, dict[str, dict]]:
    return load_resources(BOOTSTRAP)


def test_every_terraform_file_parses():
    files = sorted(INFRA.glob("*.tf"))
    assert {f.name for f in files} >= {"main.tf", "variables.tf", "outputs.tf", "versions.tf"}
    assert {f.name for f in BOOTSTRAP.glob("*.tf")} >= {"main.tf", "variables.tf", "outputs.tf", "versions.tf"}
    for path in files + sorted(BOOTSTRAP.glob("*.tf")):
        with open(path) as f:
            assert hcl2.load(f), path


def test_the_system_is_all_there(resources):
    assert set(resources["google_pubsub_topic"]) == {"push", "pull", "deadletter", "shadow", "outcomes"}
    assert {"models", "prediction_logs", "outcomes"} <= set(resources["google_storage_bucket"])
    assert set(resources["google_service_account"]) == {
        "function",
        "backend",
        "pusher",
        "mlflow",
        "training",
        "rollout",
        "scheduler",
    }
    assert "google_cloudfunctions2_function" not in resources  # a Cloud Run function now: see below
    function = resources["google_cloud_run_v2_service"]["predict"]
    assert "google_service_account.function.email" in function["template"][0]["service_account"]
    backend = resources["google_cloud_run_v2_service"]["backend"]
    assert "google_service_account.backend.email" in backend["template"][0]["service_account"]


def test_one_always_on_controller_and_a_shadow_fed_every_ride(resources):
    """Exactly one rollout controller, never scaled to zero (its resync and analysis run between webhooks);
    the shadow revision gets every ride at its tag's URL; the controller reads its own copies of the answers."""
    controller = resources["google_cloud_run_v2_service"]["rollout"]["template"][0]
    assert controller["scaling"][0] == {"min_instance_count": 1, "max_instance_count": 1}
    assert controller["containers"][0]["resources"][0]["cpu_idle"] is False
    env = {e["name"]: e.get("value") for e in controller["containers"][0]["env"]}
    assert env["ROLLOUT_ALIASES"] == "production=${local.function_service_name},challenger=${local.function_service_name}"
    assert "rollout_analysis" in env["ANALYSIS_RESULT_SUBSCRIPTIONS"] and "deadletter" in env["ANALYSIS_DEADLETTER_SUBSCRIPTION"]
    shadow = resources["google_pubsub_subscription"]["function_shadow_push"]
    assert "google_pubsub_topic.push" in shadow["topic"]
    assert '"https://shadow---"' in shadow["push_config"][0]["push_endpoint"]
    analysis = resources["google_pubsub_subscription"]["rollout_analysis"]
    assert set(analysis["for_each"]) == {"pull", "shadow", "deadletter", "outcomes"}
    assert 'rollout_analysis["outcomes"]' in env["ANALYSIS_OUTCOME_SUBSCRIPTION"]


def test_completed_rides_land_in_their_bucket_through_pubsub_alone_and_the_backend_reads_the_shadow(resources):
    """Outcomes: the backend publishes each completed ride; a Cloud Storage subscription files them as
    newline-delimited JSON (what flows.outcomes reads), written by Pub/Sub's service agent, which may
    create objects and read the bucket, nothing more."""
    sink = resources["google_pubsub_subscription"]["outcomes_to_storage"]
    assert "google_pubsub_topic.outcomes" in sink["topic"]
    storage = sink["cloud_storage_config"][0]
    assert "google_storage_bucket.outcomes.name" in storage["bucket"]
    assert storage["filename_prefix"] == "outcomes/" and storage["filename_suffix"] == ".jsonl"
    assert "avro_config" not in storage  # text: each message's data, a newline between
    agent_grants = {
        (role, re.search(r"google_storage_bucket\.(\w+)", target).group(1))
        for kind, target, role, member in _grants(resources)
        if member == "${local.pubsub_agent}" and kind == "google_storage_bucket_iam_member"
    }
    assert agent_grants == {("roles/storage.objectCreator", "outcomes"), ("roles/storage.legacyBucketReader", "outcomes")}
    assert len(sink["depends_on"]) == 2  # created once Pub/Sub may write there (it checks at creation)
    shadow = resources["google_pubsub_subscription"]["backend_shadow_answers"]
    assert "google_pubsub_topic.shadow" in shadow["topic"]
    env = {
        e["name"]: e.get("value")
        for e in resources["google_cloud_run_v2_service"]["backend"]["template"][0]["containers"][0]["env"]
    }
    assert "backend_shadow_answers.name" in env["BACKEND_SHADOW_SUBSCRIPTION"]
    assert "google_pubsub_topic.outcomes.name" in env["BACKEND_OUTCOME_STREAM"]


def test_the_function_subscription_has_dead_letter_and_retry_policies(resources):
    push = resources["google_pubsub_subscription"]["function_push"]
    assert "google_pubsub_topic.deadletter" in push["dead_letter_policy"][0]["dead_letter_topic"]
    assert push["dead_letter_policy"][0]["max_delivery_attempts"] >= 5
    assert push["retry_policy"][0]["minimum_backoff"] and push["retry_policy"][0]["maximum_backoff"]
    assert "google_service_account.pusher.email" in push["push_config"][0]["oidc_token"][0]["service_account_email"]
    assert "google_pubsub_topic.pull" in resources["google_pubsub_subscription"]["backend_results"]["topic"]


def _grants(resources) -> list[tuple[str, str, str, str]]:
    """(kind, target, role, member) for every IAM grant."""
    grants = []
    for kind, named in resources.items():
        if kind.endswith(("_iam_member", "_iam_binding", "_iam_policy")):
            for body in named.values():
                target = (
                    body.get("topic")
                    or body.get("subscription")
                    or body.get("bucket")
                    or body.get("secret_id")
                    or body.get("cloud_function")
                    or body.get("service_account_id")
                    or body.get("name")
                    or body.get("project", "")
                )
                grants.append((kind, target, body.get("role", ""), body.get("member", str(body.get("members", "")))))
    return grants


def test_no_broad_roles_no_project_level_grants_and_no_keys(resources):
    grants = _grants(resources)
    assert grants
    for kind, _, role, _ in grants:
        assert not re.search(r"owner|editor|admin", role, re.IGNORECASE), role
        assert kind.endswith("_iam_member"), kind  # additive; never replaces others' bindings
    # Grants sit on the bucket, topic, subscription, secret, function or service. Two exceptions: Cloud
    # SQL has no instance-level IAM, so that grant is on the project, narrowed by a condition to one
    # instance; listing revisions is a project-level call, granted with the read-only run.viewer.
    # (A rollout uploads no source, so nobody holds generateUploadUrl.)
    project_level = resources.get("google_project_iam_member", {})
    assert set(project_level) == {"mlflow_connects_to_its_database", "rollout_lists_revisions"}
    assert project_level["rollout_lists_revisions"]["role"] == "roles/run.viewer"
    assert "condition" not in project_level["rollout_lists_revisions"]
    grant = project_level["mlflow_connects_to_its_database"]
    assert grant["role"] == "roles/cloudsql.client"
    assert "google_sql_database_instance.mlflow.name" in grant["condition"][0]["expression"]
    assert "google_project_iam_custom_role" not in resources
    assert "google_service_account_key" not in resources
    provider_text = (INFRA / "versions.tf").read_text()
    assert "credentials =" not in provider_text


def test_each_identity_gets_exactly_what_it_uses(resources):
    by_member: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for _, target, role, member in _grants(resources):
        owner = re.search(r"google_service_account\.(\w+)\.email", member)
        resource = re.search(r'(google_\w+\.\w+(?:\["[^"]+"\])?)', target)
        by_member[owner.group(1) if owner else member].add((role, resource.group(1) if resource else target))
    assert by_member["function"] == {
        ("roles/storage.objectViewer", "google_storage_bucket.models"),
        ("roles/pubsub.publisher", "google_pubsub_topic.pull"),
        ("roles/pubsub.publisher", "google_pubsub_topic.shadow"),
        ("roles/pubsub.publisher", "google_pubsub_topic.deadletter"),
    }
    assert by_member["backend"] == {
        ("roles/pubsub.publisher", "google_pubsub_topic.push"),
        ("roles/pubsub.viewer", "google_pubsub_topic.push"),
        ("roles/pubsub.subscriber", "google_pubsub_subscription.backend_results"),
        ("roles/pubsub.viewer", "google_pubsub_subscription.backend_results"),
        ("roles/pubsub.publisher", "google_pubsub_topic.outcomes"),
        ("roles/pubsub.subscriber", "google_pubsub_subscription.backend_shadow_answers"),
        ("roles/secretmanager.secretAccessor", 'google_secret_manager_secret.app["redis-url"]'),
    }
    assert by_member["pusher"] == {("roles/run.invoker", "google_cloud_run_v2_service.predict")}
    assert by_member["mlflow"] == {
        ("roles/secretmanager.secretAccessor", 'google_secret_manager_secret.app["mlflow-db-password"]'),
        ("roles/secretmanager.secretAccessor", 'google_secret_manager_secret.app["mlflow-webhook-key"]'),
        ("roles/cloudsql.client", "${var.project_id}"),
        ("roles/storage.objectViewer", "google_storage_bucket.models"),
    }
    assert by_member["training"] == {
        ("roles/storage.objectUser", "google_storage_bucket.models"),
        ("roles/storage.objectViewer", "google_storage_bucket.outcomes"),
        ("roles/storage.objectViewer", "google_storage_bucket.prediction_logs"),  # the daily drift job
        ("roles/run.invoker", "google_cloud_run_v2_service.mlflow"),
    }
    # Cloud Scheduler's identity runs the flows' jobs (run.jobs.run), and nothing else.
    assert by_member["scheduler"] == {("roles/run.invoker", "${each.value.name}")}
    assert (
        resources["google_cloud_run_v2_job_iam_member"]["scheduler_runs_flows"]["for_each"] == "${google_cloud_run_v2_job.flows}"
    )
    # The rollout controller: its webhook secret, the registry, revisions and traffic of this one function's
    # Cloud Run service (acting as its identity), its own copies of the answers, and the models it loads at
    # pre-flight (issue 31: without this grant every promotion on Google Cloud is blocked).
    assert by_member["rollout"] == {
        # Its lease (rollout/lease.py) lives in the backend's Memorystore: the URL with its AUTH string (issue 33).
        ("roles/secretmanager.secretAccessor", 'google_secret_manager_secret.app["redis-url"]'),
        ("roles/storage.objectViewer", "google_storage_bucket.models"),
        ("roles/secretmanager.secretAccessor", 'google_secret_manager_secret.app["rollout-webhook-secret"]'),
        ("roles/run.developer", "google_cloud_run_v2_service.predict"),
        ("roles/run.viewer", "${var.project_id}"),  # listing revisions is a project-level call
        ("roles/iam.serviceAccountUser", "google_service_account.function"),
        ("roles/pubsub.subscriber", "${each.value.id}"),
        ("roles/run.invoker", "google_cloud_run_v2_service.mlflow"),
    }
    analysis = resources["google_pubsub_subscription_iam_member"]["rollout_reads_analysis"]
    assert analysis["for_each"] == "${google_pubsub_subscription.rollout_analysis}"
    # Public services have the invoker check off; no allUsers binding anywhere (Domain Restricted Sharing refuses it).
    assert "allUsers" not in by_member
    # The build (infra/bootstrap's account) reads the function's source, nothing else of the system.
    assert by_member["serviceAccount:${var.build_service_account}"] == {
        ("roles/storage.objectViewer", "google_storage_bucket.function_source")
    }
    # Riders (var.backend_invokers, allUsers by default) on the backend; operators (var.mlflow_users) on MLflow.
    assert by_member["${each.value}"] == {
        ("roles/run.invoker", "google_cloud_run_v2_service.backend"),
        ("roles/run.invoker", "google_cloud_run_v2_service.mlflow"),
    }


def _variables() -> dict[str, dict]:
    with open(INFRA / "variables.tf") as f:
        return {name: body for block in _clean(hcl2.load(f))["variable"] for name, body in block.items()}


def test_riders_can_call_the_backend_and_protection_is_a_choice(resources):
    variables = _variables()
    assert variables["backend_invokers"]["default"] == ["allUsers"]
    # allUsers means "the invoker check off", never a binding (test_public_services_work_under_domain_restricted_sharing).
    assert (
        resources["google_cloud_run_v2_service_iam_member"]["riders_invoke_backend"]["for_each"]
        == '${toset([for member in var.backend_invokers : member if member != "allUsers"])}'
    )
    assert variables["deletion_protection"]["default"] is True
    assert resources["google_cloud_run_v2_service"]["backend"]["deletion_protection"] == "${var.deletion_protection}"


def test_the_edge_is_off_by_default_and_when_on_bans_a_flooding_address_before_the_backend(resources):
    """infra/edge.tf: nothing unless edge_rate_limit_per_minute > 0; then Cloud Armor refuses (429) what an address
    sends over the rate, the backend takes traffic from the load balancer only (riders reach it at the domain) and
    counts clients one hop further left."""
    variables = _variables()
    assert variables["edge_rate_limit_per_minute"]["default"] == 0 and variables["edge_domain"]["default"] == ""
    for kind in (f"google_compute_{kind}" for kind in EDGE_KINDS):
        for name, body in resources[kind].items():
            assert body["count"] == "${local.edge ? 1 : 0}", (kind, name)
    [throttle] = [r for r in resources["google_compute_security_policy"]["edge"]["rule"] if r["action"] == "throttle"]
    options = throttle["rate_limit_options"][0]
    assert (options["exceed_action"], options["enforce_on_key"]) == ("deny(429)", "IP")
    assert options["rate_limit_threshold"][0] == {"count": "${var.edge_rate_limit_per_minute}", "interval_sec": 60}
    guarded = resources["google_compute_backend_service"]["backend"]
    assert guarded["security_policy"] == "${google_compute_security_policy.edge[0].id}"
    backend = resources["google_cloud_run_v2_service"]["backend"]
    assert backend["ingress"] == '${local.edge ? "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER" : "INGRESS_TRAFFIC_ALL"}'
    env = {e["name"]: e.get("value") for e in backend["template"][0]["containers"][0]["env"]}
    assert env["TRUSTED_PROXY_HOPS"] == '${local.edge ? "2" : "1"}'
    with open(INFRA / "outputs.tf") as f:
        [url] = [block["backend_url"] for block in _clean(hcl2.load(f))["output"] if "backend_url" in block]
    assert url["value"] == '${local.edge ? "https://${var.edge_domain}" : google_cloud_run_v2_service.backend.uri}'


# The edge (infra/edge.tf): a load balancer with Cloud Armor, all of Compute Engine.
EDGE_KINDS = (
    *("security_policy", "region_network_endpoint_group", "backend_service", "url_map", "managed_ssl_certificate"),
    *("ssl_policy", "target_https_proxy", "global_address", "global_forwarding_rule"),
)
# What each kind of resource needs enabled (the API's service name, without .googleapis.com).
API_OF = {
    "google_cloud_run_v2_service": {"run", "compute", "cloudbuild", "artifactregistry"},  # the function builds
    "google_pubsub_topic": {"pubsub"},
    "google_pubsub_subscription": {"pubsub"},
    "google_storage_bucket": {"storage"},
    "google_storage_bucket_iam_member": {"storage"},
    "google_logging_project_sink": {"logging"},
    "google_logging_metric": {"logging"},
    "google_monitoring_alert_policy": {"monitoring"},
    "google_service_account": {"iam"},
    "google_project_iam_member": {"cloudresourcemanager"},
    "google_sql_database_instance": {"sqladmin"},
    "google_secret_manager_secret": {"secretmanager"},
    "google_redis_instance": {"redis"},
    "google_compute_network": {"compute"},
    **{f"google_compute_{kind}": {"compute"} for kind in EDGE_KINDS},
    "google_artifact_registry_repository": {"artifactregistry"},
    "google_cloud_run_v2_job": {"run"},
    "google_cloud_scheduler_job": {"cloudscheduler"},
}


def _bootstrap_apis(bootstrap) -> set[str]:
    text = (BOOTSTRAP / "main.tf").read_text()
    [apis] = re.findall(r"apis = toset\(\[([^\]]*)\]\)", text)
    return set(re.findall(r'"(\w+)"', apis))


def test_bootstrap_enables_every_api_the_system_uses_and_waits_for_each(resources, bootstrap):
    """Root 1 enables the APIs (cloudresourcemanager and serviceusage too: Terraform needs them to read the
    project and enable the rest); each of its resources waits for the API it needs. The system enables none:
    it relies on root 1 having been applied."""
    enabled = _bootstrap_apis(bootstrap)
    assert {"cloudresourcemanager", "serviceusage"} <= enabled
    assert "google_project_service" not in resources
    for kind in resources:
        if kind.startswith("google_") and kind in API_OF:
            assert API_OF[kind] <= enabled, (kind, API_OF[kind] - enabled)
    services = bootstrap["google_project_service"]["apis"]
    assert services["for_each"] == "${local.apis}" and services["disable_on_destroy"] is False
    for kind, named in bootstrap.items():
        if kind == "google_project_service":
            continue
        needs = API_OF.get(kind, set()) | ({"cloudresourcemanager"} if kind == "google_project_iam_member" else set())
        needs |= {"artifactregistry"} if kind.startswith("google_artifact_registry") else set()
        for name, body in named.items():
            waits_for = set(re.findall(r'google_project_service\.apis\["(\w+)"\]', " ".join(body.get("depends_on", []))))
            assert needs and needs <= waits_for, (kind, name, needs - waits_for)


def test_bootstrap_makes_the_image_repository_and_a_build_account_with_exactly_its_roles(bootstrap):
    [repository] = bootstrap["google_artifact_registry_repository"].values()
    assert repository["format"] == "DOCKER" and repository["repository_id"] == "${local.prefix}"
    assert "ridestream-${var.env}" in (BOOTSTRAP / "main.tf").read_text()
    [account] = bootstrap["google_service_account"].values()
    assert account["account_id"] == "${local.prefix}-build"
    roles = {
        (kind, body["role"])
        for kind, named in bootstrap.items()
        if kind.endswith("_iam_member")
        for body in named.values()
        if "google_service_account.build.email" in body["member"]
    }
    # Its log, its pushes, and reading the sources `up` uploads for it (never Cloud Build's default bucket).
    assert roles == {
        ("google_project_iam_member", "roles/logging.logWriter"),
        ("google_artifact_registry_repository_iam_member", "roles/artifactregistry.writer"),
        ("google_storage_bucket_iam_member", "roles/storage.objectViewer"),
    }
    [reads] = [b for b in bootstrap["google_storage_bucket_iam_member"].values() if "build.email" in b["member"]]
    assert reads["bucket"] == "${google_storage_bucket.build_source.name}"
    with open(BOOTSTRAP / "outputs.tf") as f:
        outputs = {name for block in _clean(hcl2.load(f))["output"] for name in block}
    assert outputs == {"artifact_registry", "build_service_account", "build_source_bucket", "apis"}


def test_both_roots_keep_their_state_in_cloud_storage_given_at_init():
    for root in (INFRA, BOOTSTRAP):
        with open(root / "versions.tf") as f:
            [terraform] = _clean(hcl2.load(f))["terraform"]
        assert terraform["backend"] == [{"gcs": {}}], root  # partial: bucket and prefix at `terraform init -backend-config`


def test_the_prediction_log_sink_matches_the_functions_cloud_run_log_entries(resources):

    text = (INFRA / "main.tf").read_text()
    assert resources["google_logging_project_sink"]["predictions"]["filter"] == "${local.prediction_log_filter}"
    [sink] = [f.replace('\\"', '"') for f in re.findall(r'prediction_log_filter = "(.+)"', text)]  # HCL's escaped quotes
    [derivation] = re.findall(r"function_service_name = (.+)", text)
    assert derivation.strip() == "google_cloud_run_v2_service.predict.name"  # log entries carry the short name
    service_name = resources["google_cloud_run_v2_service"]["predict"]["name"].replace("${local.prefix}", "ridestream-prod")
    # A prediction line as Cloud Run logs it.
    entry = {
        "resource": {
            "type": "cloud_run_revision",
            "labels": {
                "service_name": "ridestream-prod-predict-duration",
                "revision_name": "ridestream-prod-predict-duration-00003-xak",
                "location": "europe-west1",
                "project_id": "ridestream-prod",
                "configuration_name": "ridestream-prod-predict-duration",
            },
        },
        "jsonPayload": {"severity": "INFO", "message": "prediction", "duration_final": 12.5},
        "logName": "projects/ridestream-prod/logs/run.googleapis.com%2Fstdout",
        "severity": "INFO",
    }
    assert "local.function_service_name" in sink
    resolved = sink.replace("${local.function_service_name}", service_name)
    assert log_filter_matches(resolved, entry)
    assert not log_filter_matches(resolved, {**entry, "jsonPayload": {**entry["jsonPayload"], "message": "cold start"}})


def test_prediction_lines_stay_off_the_logging_bill_by_default_and_still_reach_their_bucket(resources):
    exclusion = resources["google_logging_project_exclusion"]["predictions_in_bucket_only"]
    # The same lines the sink files into the bucket (one filter), left out of the _Default bucket only.
    assert exclusion["filter"] == resources["google_logging_project_sink"]["predictions"]["filter"]
    assert exclusion["count"] == "${var.prediction_logs_in_default_bucket ? 0 : 1}"
    with open(INFRA / "variables.tf") as f:
        variables = {name: spec for block in _clean(hcl2.load(f))["variable"] for name, spec in block.items()}
    assert variables["prediction_logs_in_default_bucket"]["default"] is False


def test_the_shared_result_store_keeps_its_data_and_the_backend_can_reach_it(resources):
    redis = resources["google_redis_instance"]["results"]
    assert redis["tier"] == "STANDARD_HA"  # a standby takes over on failure, with the data
    assert redis["auth_enabled"] is True
    assert redis["persistence_config"][0] == {"persistence_mode": "RDB", "rdb_snapshot_period": "ONE_HOUR"}
    template = resources["google_cloud_run_v2_service"]["backend"]["template"][0]
    [vpc] = [d["vpc_access"] for d in template["dynamic"] if "vpc_access" in d]
    assert vpc["content"][0]["egress"] == "PRIVATE_RANGES_ONLY"
    assert vpc["content"][0]["network_interfaces"][0] == {"network": "${local.network}", "subnetwork": "${local.subnetwork}"}
    assert redis["authorized_network"] == "${local.network}"


def test_the_auth_string_is_a_secret_the_backend_alone_reads(resources):
    """The Memorystore URL (with its AUTH string) is a secret version, never a plain environment variable; the
    backend reads it through a secret reference, may read that secret only, and starts once the version exists."""
    secrets = resources["google_secret_manager_secret"]["app"]
    assert '"redis-url"' in secrets["for_each"] and "local.shared_store" in secrets["for_each"]
    assert "redis-url = local.redis_url" in re.sub(r"\s+", " ", (INFRA / "main.tf").read_text())
    backend = resources["google_cloud_run_v2_service"]["backend"]
    container = backend["template"][0]["containers"][0]
    assert all(e["name"] != "REDIS_URL" for e in container.get("env", []))  # never a plain value
    [redis_env] = [d["env"] for d in container["dynamic"] if "env" in d]
    content = redis_env["content"][0]
    assert content["name"] == "REDIS_URL" and "value" not in content
    assert 'google_secret_manager_secret.app["redis-url"]' in content["value_source"][0]["secret_key_ref"][0]["secret"]
    grant = resources["google_secret_manager_secret_iam_member"]["backend_reads_redis_url"]
    assert 'app["redis-url"]' in grant["secret_id"] and "google_service_account.backend.email" in grant["member"]
    assert "${google_secret_manager_secret_version.app}" in backend["depends_on"]


def test_services_start_after_the_secret_versions_they_read(resources):
    """A revision reads its secrets at start: the IAM grant is not enough, the version must exist."""
    services = resources["google_cloud_run_v2_service"]
    for name in ("mlflow", "rollout"):
        container = services[name]["template"][0]["containers"][0]
        read = {
            re.search(r'app\["([\w-]+)"\]', e["value_source"][0]["secret_key_ref"][0]["secret"])[1]
            for e in container["env"]
            if "value_source" in e
        }
        assert read, name
        waits_for = " ".join(services[name]["depends_on"])
        for secret in read:
            assert f'google_secret_manager_secret_version.app["{secret}"]' in waits_for, (name, secret)


def test_the_system_has_its_own_network_unless_one_is_named(resources):
    variables = _variables()
    assert variables["network"]["default"] == "" and variables["subnetwork"]["default"] == ""
    network = resources["google_compute_network"]["vpc"]
    assert network["count"] == '${var.network == "" ? 1 : 0}' and network["auto_create_subnetworks"] is False
    subnet = resources["google_compute_subnetwork"]["backend"]
    assert subnet["count"] == network["count"] and "google_compute_network.vpc[0].id" in subnet["network"]
    import ipaddress

    assert ipaddress.ip_network(variables["subnet_cidr"]["default"]).prefixlen <= 26  # Direct VPC egress: /26 at least
    text = (INFRA / "main.tf").read_text()
    assert '"default"' not in text  # no resource names the default network


def test_terraform_files_are_formatted():
    import subprocess

    checked = subprocess.run(["terraform", "fmt", "-check", "-diff", "-recursive", str(INFRA)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


IGNORED_BY_TERRAFORM = {"template", "traffic", "client", "client_version", "build_config"}


def _references(value) -> set[str]:
    """Every resource, data source and local an expression names."""
    text = __import__("json").dumps(value)
    return set(re.findall(r"\b((?:data\.)?google_\w+\.\w+|data\.archive_file\.\w+|local\.\w+|var\.\w+)", text))


def _depends_on(names: set[str], locals_: dict) -> set[str]:
    """``names`` with every local expanded into what it names, transitively."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.startswith("local."):
            todo += _references(locals_.get(name.removeprefix("local."), ""))
    return seen


def _planned_changes(service: dict, changed: set[str], drifted: set[str], locals_: dict) -> set[str]:
    """The top-level arguments of ``service`` a plan would change: those it does not ignore, that either drifted
    remotely (``drifted``) or whose expression depends on something that changed (``changed``)."""
    ignored = set(service.get("lifecycle", [{}])[0].get("ignore_changes", []))
    ignored = {name.removeprefix("${").removesuffix("}") for name in ignored}
    plan = {name for name in drifted if name not in ignored}
    for name, value in service.items():
        if name in ignored or name in ("lifecycle", "depends_on"):
            continue
        if _depends_on(_references(value), locals_) & changed:
            plan.add(name)
    return plan


def _locals() -> dict:
    with open(INFRA / "main.tf") as f:
        return {name: value for block in _clean(hcl2.load(f))["locals"] for name, value in block.items()}


def test_neither_a_changed_code_zip_nor_a_second_apply_changes_which_model_riders_get(resources):
    """The plan's shape on the parsed Terraform: which model riders get is in the function service's template
    (its revisions' environment) and traffic. A changed zip changes the object's name (its content hash), which
    reaches the service only through build_config; the controller's own changes (template, traffic, and the
    client fields gcloud sets) drift the service between applies. Terraform ignores all of them, so neither
    plans a change to the service, and nothing else may replace it or move its traffic."""
    function = resources["google_cloud_run_v2_service"]["predict"]
    [lifecycle] = function["lifecycle"]
    assert set(lifecycle["ignore_changes"]) >= IGNORED_BY_TERRAFORM
    assert "replace_triggered_by" not in lifecycle and "create_before_destroy" not in lifecycle
    locals_ = _locals()
    new_zip = {"data.archive_file.function", "google_storage_bucket_object.function_source"}
    assert _depends_on(_references(function["build_config"]), locals_) & new_zip  # the zip does reach the service...
    assert _planned_changes(function, new_zip, set(), locals_) == set()  # ...and changes nothing there
    controller_drift = {"template", "traffic", "client", "client_version"}
    assert _planned_changes(function, set(), controller_drift, locals_) == set()  # a second apply
    # The check itself: without build_config ignored, the new zip would be planned (a rebuild: a new revision).
    unguarded = {**function, "lifecycle": [{"ignore_changes": sorted(IGNORED_BY_TERRAFORM - {"build_config"})}]}
    assert _planned_changes(unguarded, new_zip, set(), locals_) == {"build_config"}
    # Terraform sets no traffic split on the function, and no other resource manages the same service by name or
    # moves its traffic (a second google_cloud_run_* service named like it would take its revisions over).
    assert "traffic" not in function
    for kind, named in resources.items():
        for name, body in named.items():
            if (kind, name) == ("google_cloud_run_v2_service", "predict") or not kind.startswith("google_cloud_run"):
                continue
            assert not (kind.endswith("_service") and body.get("name") == function["name"]), (kind, name)
            assert "google_cloud_run_v2_service.predict" not in str(body.get("traffic", "")), (kind, name)
    # Created serving no model: the controller gives each revision its model (serving_function refuses rides
    # for redelivery until then); no variable chooses one.
    [env] = [d["env"] for d in function["template"][0]["containers"][0]["dynamic"] if "env" in d]
    assert {"BACKEND_PULL_STREAM", "MODEL_BUCKET"} <= set(env["for_each"])
    assert not set(env["for_each"]) & {"RUN_ID", "MODEL_URI", "MODEL_VERSION"}
    assert "env" not in function["template"][0]["containers"][0]
    assert not {"run_id", "model_uri", "model_version"} & set(_variables())


def test_the_function_is_a_cloud_run_function_pushed_to_with_an_oidc_token(resources):
    function = resources["google_cloud_run_v2_service"]["predict"]
    [build] = function["build_config"]
    assert build["function_target"] == "predict_duration_cloudevent"
    import ast

    entry_points = {
        n.name for n in ast.parse((REPO / "serving_function/main.py").read_text()).body if isinstance(n, ast.FunctionDef)
    }
    assert build["function_target"] in entry_points
    assert build["source_location"] == (
        "gs://${google_storage_bucket.function_source.name}/${google_storage_bucket_object.function_source.name}"
    )
    assert build["service_account"] == "projects/${var.project_id}/serviceAccounts/${var.build_service_account}"
    # build_config starts no build: the service runs an image `up` built before the apply, from the same folder
    # with the same target (operations/cloudbuild-function.yaml), given as a variable without a default.
    [container] = function["template"][0]["containers"]
    assert container["image"] == "${var.function_image}" and "default" not in _variables()["function_image"]
    pack = (REPO / "operations/cloudbuild-function.yaml").read_text()
    assert f"GOOGLE_FUNCTION_TARGET={build['function_target']}" in pack
    from operations.deploy import PYTHON_VERSION

    assert f"GOOGLE_PYTHON_VERSION={PYTHON_VERSION}.x" in pack  # the runtime operations/deploy.py names
    assert function["ingress"] == "INGRESS_TRAFFIC_INTERNAL_ONLY"  # Pub/Sub push is internal traffic
    push = resources["google_pubsub_subscription"]["function_push"]["push_config"][0]
    assert push["push_endpoint"] == "${google_cloud_run_v2_service.predict.uri}"
    assert "google_service_account.pusher.email" in push["oidc_token"][0]["service_account_email"]
    variables = _variables()
    assert "default" not in variables["build_service_account"]


def test_the_code_zip_is_reproducible_and_named_by_its_content():
    """The zip's bytes must not depend on the machine that builds it (each file's mode follows the umask unless
    fixed), and the object is named by the hash of those bytes: the same code is the same object."""
    with open(INFRA / "main.tf") as f:
        data = _clean(hcl2.load(f))["data"]
    [archive] = [named["function"] for block in data for kind, named in block.items() if kind == "archive_file"]
    assert archive["output_file_mode"] == "0644"
    assert "__pycache__" in archive["excludes"]
    source_object = load_resources(INFRA)["google_storage_bucket_object"]["function_source"]
    assert "data.archive_file.function.output_sha256" in source_object["name"]


def test_checkov_finds_nothing_and_every_skip_says_why():
    import json
    import subprocess

    checkov = REPO / ".venv/tools/checkov/bin/checkov"
    assert checkov.exists(), "checkov is installed by `make test` (and `make test-fast`) into .venv/tools/checkov"
    scan = subprocess.run(
        [str(checkov), "-d", str(INFRA), "--framework", "terraform", "--output", "json", "--compact"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(scan.stdout)
    summary = report["summary"]
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0 and not failed, failed
    assert summary["passed"] > 0
    for skipped in report["results"]["skipped_checks"]:
        assert len(skipped["check_result"].get("suppress_comment", "")) > 20, skipped["check_id"]  # a reason, not a shrug


META_ARGUMENTS = {"count", "for_each", "depends_on", "lifecycle", "provider", "dynamic"}


def _unknown_arguments(body: dict, schema: dict, where: str) -> list[str]:
    """Every argument or block in ``body`` that the provider's schema does not have, with its path."""
    unknown = []
    for key, value in body.items():
        if key == "dynamic":  # dynamic "block" { content { ... } }: the block must exist, its content is checked
            for dynamic in value:
                for label, spec in dynamic.items():
                    if label not in schema:
                        unknown.append(f"{where}.dynamic.{label}")
                    for content in spec.get("content", []):
                        unknown += _unknown_arguments(content, schema.get(label, {}), f"{where}.{label}")
            continue
        if key in META_ARGUMENTS and where.count(".") == 1:
            continue
        if key not in schema:
            unknown.append(f"{where}.{key}")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value) and schema[key]:
            for block in value:
                unknown += _unknown_arguments(block, schema[key], f"{where}.{key}")
    return unknown


def test_every_argument_is_in_the_google_providers_published_schema(resources):
    import json

    schema = json.loads((INFRA / "google-provider-schema.json").read_text())
    assert schema["provider"].startswith("hashicorp/google 6.")  # versions.tf asks for ~> 6.0
    with open(INFRA / "main.tf") as f:
        data = {
            name: body
            for block in _clean(hcl2.load(f)).get("data", [])
            for kind, named in block.items()
            for name, body in named.items()
            if kind.startswith("google_")
        }
    checked, unknown = 0, []
    both_roots = {kind: {**named, **load_resources(BOOTSTRAP).get(kind, {})} for kind, named in resources.items()}
    both_roots |= {kind: named for kind, named in load_resources(BOOTSTRAP).items() if kind not in both_roots}
    for kind, named in both_roots.items():
        if not kind.startswith("google_"):
            continue
        assert kind in schema["resource"], f"{kind}: regenerate with `make provider-schema`"
        for name, body in named.items():
            unknown += _unknown_arguments(body, schema["resource"][kind], f"{kind}.{name}")
            checked += 1
    assert checked >= 20 and not unknown, unknown
    assert all(set(body) <= set(schema["data"]["google_project"]) for body in data.values())


def test_the_schema_check_catches_a_misspelt_argument_and_block():
    import json

    schema = json.loads((INFRA / "google-provider-schema.json").read_text())["resource"]["google_storage_bucket"]
    good = {"name": "b", "location": "EU", "versioning": [{"enabled": True}], "count": 1}
    assert _unknown_arguments(good, schema, "google_storage_bucket.b") == []
    bad = {"name": "b", "locaton": "EU", "versioning": [{"enable": True}]}
    assert _unknown_arguments(bad, schema, "google_storage_bucket.b") == [
        "google_storage_bucket.b.locaton",
        "google_storage_bucket.b.versioning.enable",
    ]


def test_the_mlflow_server_keeps_its_registry_in_cloud_sql_and_its_password_in_secret_manager(resources):
    server = resources["google_cloud_run_v2_service"]["mlflow"]["template"][0]
    assert "google_service_account.mlflow.email" in server["service_account"]
    [volume] = server["volumes"]
    assert "google_sql_database_instance.mlflow.connection_name" in volume["cloud_sql_instance"][0]["instances"][0]
    env = {e["name"]: e for e in server["containers"][0]["env"]}
    assert (
        'google_secret_manager_secret.app["mlflow-db-password"]'
        in env["DB_PASSWORD"]["value_source"][0]["secret_key_ref"][0]["secret"]
    )
    assert "value" not in env["DB_PASSWORD"]  # never in the service's configuration
    assert "google_storage_bucket.models.name" in env["ARTIFACT_ROOT"]["value"]
    database = resources["google_sql_database_instance"]["mlflow"]
    assert database["database_version"].startswith("POSTGRES_")
    assert database["settings"][0]["ip_configuration"][0]["ssl_mode"] == "ENCRYPTED_ONLY"
    assert database["settings"][0]["backup_configuration"][0]["enabled"] is True
    # The image runs exactly that: the socket, the secret, the bucket.
    dockerfile = (REPO / "tracking_server/Dockerfile").read_text()
    for needed in ("${DB_PASSWORD}", "/cloudsql/${CLOUD_SQL_INSTANCE}", "${ARTIFACT_ROOT}", "--no-serve-artifacts", "USER app"):
        assert needed in dockerfile, needed


def test_the_default_deployment_keeps_every_ride_in_a_shared_store(resources):
    """Results in one instance's memory lose every pending and finished ride on each restart or deploy."""
    with open(INFRA / "variables.tf") as f:
        variables = {name: body for block in _clean(hcl2.load(f))["variable"] for name, body in block.items()}
    assert variables["memorystore_size_gb"]["default"] >= 1 and variables["allow_in_memory_results"]["default"] is False
    redis = resources["google_redis_instance"]["results"]
    assert redis["redis_configs"] == {"maxmemory-policy": "noeviction"}  # full: refuse (503), never evict pending rides
    [guard] = resources["google_cloud_run_v2_service"]["backend"]["lifecycle"][0]["precondition"]
    assert guard["condition"] == "${local.shared_store || var.allow_in_memory_results}"


def test_no_other_sites_page_may_call_the_rider_api_unless_listed(resources, tmp_path):
    """CORS: an empty allow-list by default, passed to the backend as the setting it reads; Terraform
    refuses at plan exactly the entries the backend would refuse at start (both evaluated here)."""
    import json
    import subprocess

    from backend.settings import allowed_origins

    with open(INFRA / "variables.tf") as f:
        variables = {name: body for block in _clean(hcl2.load(f))["variable"] for name, body in block.items()}
    assert variables["backend_cors_allowed_origins"]["default"] == []
    env = {
        e["name"]: e["value"] for e in resources["google_cloud_run_v2_service"]["backend"]["template"][0]["containers"][0]["env"]
    }
    assert env["CORS_ALLOWED_ORIGINS"] == '${join(",", var.backend_cors_allowed_origins)}'

    block = (INFRA / "variables.tf").read_text().split('variable "backend_cors_allowed_origins"')[1]
    [condition] = re.findall(r"condition\s*=\s*(.+)", block.split("error_message")[0])
    samples = [
        "https://app.example.com",
        "http://127.0.0.1:3000",
        "*",
        "app.example.com",
        "https://a.example/path",
        "ftp://b.example",
    ]
    expressions = [condition.replace("var.backend_cors_allowed_origins", json.dumps([origin])) for origin in samples]
    # One expression (the console prints only the last one's value), offline: no provider is needed.
    console = subprocess.run(
        ["terraform", "console"],
        input=f"jsonencode([{', '.join(expressions)}])\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert console.returncode == 0, console.stderr
    terraform_accepts = json.loads(json.loads(console.stdout.strip().splitlines()[-1]))

    def backend_accepts(origin: str) -> bool:
        try:
            return allowed_origins(origin) == (origin,)
        except ValueError:
            return False

    assert terraform_accepts == [backend_accepts(origin) for origin in samples] == [True, True, False, False, False, False]


def test_a_ride_is_delivered_a_bounded_number_of_times_and_duplicates_wait_inside_the_function_timeout(resources):
    from backend.settings import BackendSettings
    from serving_function.prediction import IN_FLIGHT_WAIT_SECONDS

    push = resources["google_pubsub_subscription"]["function_push"]
    publishes = BackendSettings.from_env().resend_max_attempts
    assert publishes * push["dead_letter_policy"][0]["max_delivery_attempts"] <= 25
    # A second delivery waiting for the first must give up (and be redelivered) before the function is cut off.
    timeout = resources["google_cloud_run_v2_service"]["predict"]["template"][0]["timeout"]
    assert int(timeout.removesuffix("s")) / 2 >= IN_FLIGHT_WAIT_SECONDS


def test_the_quick_gcloud_path_deploys_the_function_with_terraforms_limits(resources):
    from operations import deploy

    template = resources["google_cloud_run_v2_service"]["predict"]["template"][0]
    assert template["scaling"][0]["max_instance_count"] == deploy.MAX_INSTANCES
    assert template["max_instance_request_concurrency"] == deploy.CONCURRENCY


def test_public_services_work_under_domain_restricted_sharing(resources):
    """A public Cloud Run service under Domain Restricted Sharing: the invoker IAM check off, never an allUsers
    binding, which the organization policy refuses (https://cloud.google.com/run/docs/authenticating/public)."""
    services = resources["google_cloud_run_v2_service"]
    assert services["rollout"]["invoker_iam_disabled"] is True  # MLflow's webhooks: HMAC-signed, no identity
    assert services["backend"]["invoker_iam_disabled"] == "${local.public_backend}"
    assert _locals()["public_backend"] == '${contains(var.backend_invokers, "allUsers")}'
    for name in ("predict", "mlflow"):
        assert "invoker_iam_disabled" not in services[name], name  # behind IAM: the pusher, training, operators
    members = [
        body.get("member", "") for kind, named in resources.items() if kind.endswith("_iam_member") for body in named.values()
    ]
    assert not [m for m in members if m in ("allUsers", "allAuthenticatedUsers")]


# Cloud SQL for PostgreSQL, from Google's documentation:
# - editions and their machine types: https://cloud.google.com/sql/docs/postgres/editions-intro and
#   https://cloud.google.com/sql/docs/postgres/instance-settings ("Machine type"): Enterprise Plus runs only
#   the performance-optimized (db-perf-optimized-N-*) and C4A series; the shared-core tiers (db-f1-micro,
#   db-g1-small) and custom machines (db-custom-CPUS-MB) are Enterprise only.
# - custom machines: 1 vCPU or an even number 2-96; memory 0.9-6.5 GB per vCPU, a multiple of 256 MB, at
#   least 3.75 GB (https://cloud.google.com/sql/docs/postgres/create-instance, "Custom machine types").
# - the default edition: PostgreSQL 16 and later are created as Enterprise Plus when no edition is given
#   (instance-settings, "Edition"); the provider reports "Invalid Tier (db-g1-small) for (ENTERPRISE_PLUS) Edition".
# - versions per edition (instance-settings, "Database version"): Enterprise Plus POSTGRES_12 to POSTGRES_18;
#   Enterprise POSTGRES_9_6 to POSTGRES_18.
ENTERPRISE_PLUS_VERSIONS = {f"POSTGRES_{v}" for v in range(12, 19)}
ENTERPRISE_VERSIONS = {"POSTGRES_9_6"} | {f"POSTGRES_{v}" for v in range(10, 19)}


def cloud_sql_refusal(version: str, edition: str | None, tier: str) -> str | None:
    """Why Cloud SQL refuses this combination, or None."""
    number = int(version.split("_")[1]) if version.startswith("POSTGRES_") else 0
    edition = edition or ("ENTERPRISE_PLUS" if number >= 16 else "ENTERPRISE")
    versions = ENTERPRISE_PLUS_VERSIONS if edition == "ENTERPRISE_PLUS" else ENTERPRISE_VERSIONS
    if version not in versions:
        return f"{version} is not offered in {edition}"
    if edition == "ENTERPRISE_PLUS":
        ok = re.fullmatch(r"db-perf-optimized-N-(2|4|8|16|32|48|64|80|96|128)|db-c4a-highmem-\d+", tier)
        return None if ok else f"Invalid Tier ({tier}) for (ENTERPRISE_PLUS) Edition"
    if tier in ("db-f1-micro", "db-g1-small"):
        return None
    custom = re.fullmatch(r"db-custom-(\d+)-(\d+)", tier)
    if not custom:
        return f"Invalid Tier ({tier}) for (ENTERPRISE) Edition"
    cpus, memory_mb = int(custom[1]), int(custom[2])
    if not (cpus == 1 or (cpus % 2 == 0 and 2 <= cpus <= 96)):
        return f"{cpus} vCPUs: 1, or an even number 2-96"
    if memory_mb % 256 or memory_mb < 3840 or not (0.9 * 1024 * cpus <= memory_mb <= 6.5 * 1024 * cpus):
        return f"{memory_mb} MB for {cpus} vCPUs: 0.9-6.5 GB per vCPU, a multiple of 256 MB, 3.75 GB at least"
    return None


def test_the_documented_cloud_sql_rules_refuse_what_google_refuses():
    assert cloud_sql_refusal("POSTGRES_18", None, "db-g1-small") == "Invalid Tier (db-g1-small) for (ENTERPRISE_PLUS) Edition"
    assert cloud_sql_refusal("POSTGRES_18", "ENTERPRISE", "db-g1-small") is None
    assert cloud_sql_refusal("POSTGRES_15", None, "db-f1-micro") is None  # before 16 the default is Enterprise
    assert cloud_sql_refusal("POSTGRES_18", "ENTERPRISE_PLUS", "db-perf-optimized-N-2") is None
    assert cloud_sql_refusal("POSTGRES_18", "ENTERPRISE", "db-custom-2-7680") is None
    assert cloud_sql_refusal("POSTGRES_18", "ENTERPRISE", "db-custom-3-7680")  # odd vCPUs
    assert cloud_sql_refusal("POSTGRES_11", "ENTERPRISE_PLUS", "db-perf-optimized-N-2")


def test_every_cloud_sql_edition_tier_and_version_in_infra_is_one_cloud_sql_accepts(resources):
    """Every instance, with the tier variable's default and the example of each tier its validation admits."""
    variables = _variables()
    tiers = {variables["mlflow_db_tier"]["default"], "db-f1-micro", "db-g1-small", "db-custom-1-3840", "db-custom-2-7680"}
    [validation] = variables["mlflow_db_tier"]["validation"]
    [allowed] = re.findall(r'regex\("(.+?)", var\.mlflow_db_tier', validation["condition"])
    allowed = allowed.replace("\\\\", "\\")
    assert not re.fullmatch(allowed, "db-perf-optimized-N-2")  # the validation keeps Enterprise Plus tiers out
    checked = 0
    for name, instance in resources["google_sql_database_instance"].items():
        [settings] = instance["settings"]
        for tier in tiers if settings["tier"] == "${var.mlflow_db_tier}" else {settings["tier"]}:
            assert re.fullmatch(allowed, tier) or settings["tier"] != "${var.mlflow_db_tier}", tier
            assert cloud_sql_refusal(instance["database_version"], settings.get("edition"), tier) is None, (name, tier)
            checked += 1
    assert checked >= 4


def _run_terraform_plan(root, variables: dict[str, str]):
    import subprocess

    init = subprocess.run(
        ["terraform", "init", "-input=false", "-no-color"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert init.returncode == 0, init.stdout + init.stderr
    args = [f"-var={name}={value}" for name, value in variables.items()]
    return subprocess.run(
        ["terraform", "plan", "-input=false", "-no-color", *args], cwd=root, capture_output=True, text=True, timeout=120
    )


def _blocks(text: str, header: str) -> str:
    """The whole HCL block that starts with ``header`` (braces balanced)."""
    start = text.index(header)
    depth, i = 0, text.index("{", start)
    while True:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
        if depth == 0:
            return text[start:i]


def test_names_past_their_limits_are_refused_at_plan_with_the_reason(tmp_path):
    """Real Terraform, offline (no provider is needed): infra/'s env and project_id variables, its bucket names
    and the precondition that guards them, fed a long env and a long project id."""
    variables = (INFRA / "variables.tf").read_text()
    main = (INFRA / "main.tf").read_text()
    (tmp_path / "main.tf").write_text(
        "\n".join(
            [
                _blocks(variables, 'variable "project_id"'),
                _blocks(variables, 'variable "env"'),
                _blocks(main, "locals {\n  buckets"),
                _blocks(main, 'resource "terraform_data" "name_limits"'),
            ]
        )
    )
    fine = _run_terraform_plan(tmp_path, {"project_id": "my-project-123456", "env": "prod"})
    assert fine.returncode == 0, fine.stdout + fine.stderr
    long_env = _run_terraform_plan(tmp_path, {"project_id": "my-project-123456", "env": "production"})
    assert long_env.returncode != 0 and "env must be 1-8 lowercase letters" in long_env.stderr
    project_id = "a-thirty-character-project-id1"  # the longest a project id may be
    long_project = _run_terraform_plan(tmp_path, {"project_id": project_id, "env": "staging"})
    message = " ".join(long_project.stderr.replace("│", "").split())
    assert long_project.returncode != 0 and "Bucket names are at most 63 characters" in message, long_project.stderr
    assert f"{project_id}-ridestream-staging-function-source (65)" in message


def test_every_name_env_enters_keeps_within_its_limit_at_the_longest_env(resources, bootstrap):
    """With the longest env the validation admits (8 characters), every name built from it fits: service
    account ids 6-30, Cloud Run service and job names 49, Memorystore ids 40, secret ids 255."""
    env = "a" * 8

    def names(body: dict, argument: str) -> list[str]:
        """The names a resource makes: one per for_each key (a job's key becomes its name's suffix)."""
        keys = list(body["for_each"]) if isinstance(body.get("for_each"), dict) else ["mlflow-webhook-key"]
        named = body[argument].replace("${local.prefix}", f"ridestream-{env}")
        return [
            named.replace('${replace(each.key, "_", "-")}', key.replace("_", "-")).replace("${each.key}", key) for key in keys
        ]

    limits = {
        "google_service_account": ("account_id", 6, 30),
        "google_cloud_run_v2_service": ("name", 1, 49),
        "google_cloud_run_v2_job": ("name", 1, 49),
        "google_redis_instance": ("name", 1, 40),
        "google_secret_manager_secret": ("secret_id", 1, 255),
        "google_artifact_registry_repository": ("repository_id", 1, 63),
    }
    checked = 0
    for root in (resources, bootstrap):
        for kind, (argument, low, high) in limits.items():
            for body in root.get(kind, {}).values():
                for value in names(body, argument):
                    assert "${" not in value and low <= len(value) <= high, (kind, value, len(value))
                    checked += 1
    assert checked >= 12


def test_the_outputs_are_exactly_what_operations_reads():
    with open(INFRA / "outputs.tf") as f:
        outputs = {name for block in _clean(hcl2.load(f))["output"] for name in block}
    interface = {
        "project_id", "region", "function_service", "backend_url", "mlflow_url", "mlflow_service", "rollout_url",
        "rollout_service", "rollout_webhook_url", "topics", "model_bucket", "function_source_bucket",
        "service_accounts", "outcomes", "prediction_logs", "deletion_protected",
    }  # fmt: skip
    # The flows' Cloud Run jobs and the dashboard (infra/flows.tf); the edge's address, for DNS (infra/edge.tf).
    assert outputs - {"jobs", "dashboard", "edge_address"} == interface


def test_every_resource_with_deletion_protection_is_listed_for_teardown(resources):
    with open(INFRA / "outputs.tf") as f:
        [listed] = [
            block["deletion_protected"]["value"] for block in _clean(hcl2.load(f))["output"] if "deletion_protected" in block
        ]
    protected = {
        f"{kind}.{name}"
        for kind, named in resources.items()
        for name, body in named.items()
        if body.get("deletion_protection") == "${var.deletion_protection}"
    }
    assert protected and all(address in listed for address in protected), (protected, listed)
