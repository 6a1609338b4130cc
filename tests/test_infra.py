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


def test_every_terraform_file_parses():
    files = sorted(INFRA.glob("*.tf"))
    assert {f.name for f in files} >= {"main.tf", "variables.tf", "outputs.tf", "versions.tf"}
    for path in files:
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
    function = resources["google_cloudfunctions2_function"]["predict"]
    assert function["build_config"][0]["runtime"] == "python311"
    assert function["build_config"][0]["entry_point"] == "predict_duration_cloudevent"
    assert "google_service_account.function.email" in function["service_config"][0]["service_account_email"]
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
    # Grants sit on the bucket, topic, subscription, secret, function or service. One exception: Cloud
    # SQL has no instance-level IAM, so that grant is on the project, narrowed by a condition to one
    # instance. (A rollout uploads no source, so nobody holds generateUploadUrl.)
    project_level = resources.get("google_project_iam_member", {})
    assert set(project_level) == {"mlflow_connects_to_its_database"}
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
    }
    assert by_member["pusher"] == {("roles/run.invoker", "google_cloudfunctions2_function.predict")}
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
        ("roles/storage.objectViewer", "google_storage_bucket.models"),
        ("roles/secretmanager.secretAccessor", 'google_secret_manager_secret.app["rollout-webhook-secret"]'),
        ("roles/run.developer", "google_cloudfunctions2_function.predict"),
        ("roles/iam.serviceAccountUser", "google_service_account.function"),
        ("roles/pubsub.subscriber", "${each.value.id}"),
        ("roles/run.invoker", "google_cloud_run_v2_service.mlflow"),
    }
    analysis = resources["google_pubsub_subscription_iam_member"]["rollout_reads_analysis"]
    assert analysis["for_each"] == "${google_pubsub_subscription.rollout_analysis}"
    # MLflow's webhooks carry no Google identity: anyone may call the rollout service, which checks an HMAC.
    assert by_member["allUsers"] == {("roles/run.invoker", "google_cloud_run_v2_service.rollout")}
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
    assert (
        resources["google_cloud_run_v2_service_iam_member"]["riders_invoke_backend"]["for_each"]
        == "${toset(var.backend_invokers)}"
    )
    assert variables["deletion_protection"]["default"] is True
    assert resources["google_cloud_run_v2_service"]["backend"]["deletion_protection"] == "${var.deletion_protection}"


def test_a_fresh_project_gets_every_api_the_resources_use(resources):
    text = (INFRA / "main.tf").read_text()
    [apis] = re.findall(r"apis = toset\(concat\(\s*\[([^\]]*)\]", text)
    enabled = set(re.findall(r'"(\w+)"', apis))
    used = {
        "google_cloudfunctions2_function": {"cloudfunctions", "run", "cloudbuild", "artifactregistry", "eventarc"},
        "google_cloud_run_v2_service": {"run", "compute"},
        "google_pubsub_topic": {"pubsub"},
        "google_storage_bucket": {"storage"},
        "google_logging_project_sink": {"logging"},
        "google_service_account": {"iam"},
    }
    for kind, needs in used.items():
        assert kind in resources and needs <= enabled, (kind, needs - enabled)
    assert '["redis"]' in text  # with a Memorystore instance only
    assert resources["google_project_service"]["apis"]["disable_on_destroy"] is False
    for kind, name in (("google_cloudfunctions2_function", "predict"), ("google_cloud_run_v2_service", "backend")):
        assert resources[kind][name]["depends_on"] == ["${google_project_service.apis}"]


def test_the_prediction_log_sink_matches_the_functions_cloud_run_log_entries(resources, tmp_path):
    import json
    import subprocess

    text = (INFRA / "main.tf").read_text()
    assert resources["google_logging_project_sink"]["predictions"]["filter"] == "${local.prediction_log_filter}"
    [sink] = [f.replace('\\"', '"') for f in re.findall(r'prediction_log_filter = "(.+)"', text)]  # HCL's escaped quotes
    [derivation] = re.findall(r"function_service_name = (.+)", text)
    # What the provider reports for a gen2 function, and a prediction line as Cloud Run logs it.
    service_path = "projects/ridestream-prod/locations/europe-west1/services/ridestream-prod-predict-duration"
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
    # Terraform itself (offline, no provider) evaluates the name the filter uses.
    expression = derivation.replace("google_cloudfunctions2_function.predict.service_config[0].service", json.dumps(service_path))
    console = subprocess.run(
        ["terraform", "console"], input=expression + "\n", capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert console.returncode == 0 and console.stdout.strip(), console.stderr
    service_name = json.loads(console.stdout.strip().splitlines()[-1])
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
    env = {e["name"]: e["value"] for e in template["containers"][0]["env"]}
    assert "local.redis_url" in env["REDIS_URL"]


def test_terraform_files_are_formatted():
    import subprocess

    checked = subprocess.run(["terraform", "fmt", "-check", "-diff", "-recursive", str(INFRA)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_terraform_leaves_the_model_identity_to_redeploy(resources):
    from operations.deploy import _model_env
    from training.registry import ResolvedModel

    function = resources["google_cloudfunctions2_function"]["predict"]
    ignored = " ".join(function["lifecycle"][0]["ignore_changes"])
    model = ResolvedModel("ride-duration", "production", "3", "run-3", "models:/ride-duration@production", "gs://b/m")
    owned_by_redeploy = set(_model_env(model))
    assert owned_by_redeploy == {"RUN_ID", "MODEL_URI", "MODEL_VERSION"}
    for name in owned_by_redeploy:
        assert f'environment_variables["{name}"]' in ignored, name
        assert name in function["service_config"][0]["environment_variables"]


def test_checkov_finds_nothing_and_every_skip_says_why():
    import json
    import subprocess

    checkov = REPO / ".venv/tools/checkov/bin/checkov"
    assert checkov.exists(), "checkov is installed by `make setup` into .venv/tools/checkov"
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
    for kind, named in resources.items():
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
    timeout = resources["google_cloudfunctions2_function"]["predict"]["service_config"][0]["timeout_seconds"]
    assert timeout / 2 >= IN_FLIGHT_WAIT_SECONDS


def test_the_quick_gcloud_path_deploys_the_function_with_terraforms_limits(resources):
    from operations import deploy

    service = resources["google_cloudfunctions2_function"]["predict"]["service_config"][0]
    assert service["max_instance_count"] == deploy.MAX_INSTANCES
    assert service["max_instance_request_concurrency"] == deploy.CONCURRENCY
