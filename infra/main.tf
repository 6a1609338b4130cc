locals {
  prefix = "ridestream-${var.env}"
  topics = {
    push       = "${local.prefix}-backend-push-stream"
    pull       = "${local.prefix}-backend-pull-stream"
    deadletter = "${local.prefix}-backend-deadletter-stream"
    shadow     = "${local.prefix}-backend-shadow-stream"  # the shadow revision's answers, kept on each ride
    outcomes   = "${local.prefix}-backend-outcome-stream" # completed rides: every answer and the actual duration
  }
  # Pub/Sub's own service agent moves undeliverable messages to the dead-letter topic.
  pubsub_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
  # The backend replicas' shared store: the Memorystore created here, or one given by URL.
  # Cloud Run log entries name their service by its short name; the function reports the full path
  # (projects/P/locations/R/services/NAME).
  function_service_name = element(reverse(split("/", google_cloudfunctions2_function.predict.service_config[0].service)), 0)
  # The function's prediction lines (production's and the shadow's: revisions of the one service).
  prediction_log_filter = "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=\"${local.function_service_name}\" AND jsonPayload.message=\"prediction\""
  # Every API the resources below use: a fresh project has them off, and the first apply would fail.
  apis = toset(concat(
    ["cloudfunctions", "run", "cloudbuild", "artifactregistry", "eventarc", "pubsub", "storage", "logging", "iam", "compute", "sqladmin", "secretmanager", "monitoring"],
    var.memorystore_size_gb > 0 ? ["redis"] : [],
  ))
  # Whether the replicas share a store, decided without the (sensitive) URL: for_each and count
  # may not depend on sensitive values.
  shared_store = var.memorystore_size_gb > 0 || var.redis_url != ""
  redis_url    = var.memorystore_size_gb > 0 ? "redis://:${google_redis_instance.results[0].auth_string}@${google_redis_instance.results[0].host}:${google_redis_instance.results[0].port}/0" : var.redis_url
}

data "google_project" "this" {}

# --- storage -----------------------------------------------------------------------------------

resource "google_storage_bucket" "models" {
  #checkov:skip=CKV_GCP_62:object access is recorded by Cloud Audit Logs (Data Access); legacy usage-log buckets add nothing
  name                        = "${var.project_id}-${local.prefix}-models"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  versioning {
    enabled = true
  }
}

resource "google_storage_bucket" "function_source" {
  #checkov:skip=CKV_GCP_62:object access is recorded by Cloud Audit Logs (Data Access); legacy usage-log buckets add nothing
  #checkov:skip=CKV_GCP_78:build uploads are reproducible from git; old versions would only cost storage
  name                        = "${var.project_id}-${local.prefix}-function-source"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
}

resource "google_storage_bucket" "prediction_logs" {
  #checkov:skip=CKV_GCP_62:object access is recorded by Cloud Audit Logs (Data Access); legacy usage-log buckets add nothing
  #checkov:skip=CKV_GCP_78:the sink only appends new objects and a lifecycle rule deletes them; nothing is overwritten
  name                        = "${var.project_id}-${local.prefix}-prediction-logs"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  lifecycle_rule {
    condition {
      age = 400
    }
    action {
      type = "Delete"
    }
  }
}

# Completed rides (every answer and the actual duration), filed by Pub/Sub itself (a Cloud Storage
# subscription); the monitoring flow reads them.
resource "google_storage_bucket" "outcomes" {
  #checkov:skip=CKV_GCP_62:object access is recorded by Cloud Audit Logs (Data Access); legacy usage-log buckets add nothing
  #checkov:skip=CKV_GCP_78:the subscription only writes new objects and a lifecycle rule deletes them; nothing is overwritten
  name                        = "${var.project_id}-${local.prefix}-outcomes"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  lifecycle_rule {
    condition {
      age = 400
    }
    action {
      type = "Delete"
    }
  }
}

# --- streams -----------------------------------------------------------------------------------

resource "google_pubsub_topic" "push" {
  #checkov:skip=CKV_GCP_83:rides and results are encrypted at rest with Google-managed keys; a customer key (kms_key_name) is an option, not a need here
  name = local.topics.push
}

resource "google_pubsub_topic" "pull" {
  #checkov:skip=CKV_GCP_83:rides and results are encrypted at rest with Google-managed keys; a customer key (kms_key_name) is an option, not a need here
  name = local.topics.pull
}

resource "google_pubsub_topic" "shadow" {
  #checkov:skip=CKV_GCP_83:rides and results are encrypted at rest with Google-managed keys; a customer key (kms_key_name) is an option, not a need here
  name = local.topics.shadow
}

resource "google_pubsub_topic" "outcomes" {
  #checkov:skip=CKV_GCP_83:rides and results are encrypted at rest with Google-managed keys; a customer key (kms_key_name) is an option, not a need here
  name = local.topics.outcomes
}

resource "google_pubsub_topic" "deadletter" {
  #checkov:skip=CKV_GCP_83:rides and results are encrypted at rest with Google-managed keys; a customer key (kms_key_name) is an option, not a need here
  name = local.topics.deadletter
}

# Shared by every backend replica: each result reaches one replica, which stores it in Redis.
resource "google_pubsub_subscription" "backend_results" {
  name                       = "${local.topics.pull}-backend"
  topic                      = google_pubsub_topic.pull.id
  ack_deadline_seconds       = 30
  message_retention_duration = "86400s"
  expiration_policy {
    ttl = ""
  }
}

# The shadow revision's answers onto each ride's record (beside its final), for live quality.
resource "google_pubsub_subscription" "backend_shadow_answers" {
  name                       = "${local.topics.shadow}-backend"
  topic                      = google_pubsub_topic.shadow.id
  ack_deadline_seconds       = 30
  message_retention_duration = "3600s"
  expiration_policy {
    ttl = ""
  }
}

# Completed rides land in the bucket with no code of ours: newline-delimited JSON, one object per
# 5 minutes or 1,000 rides (https://cloud.google.com/pubsub/docs/cloudstorage).
resource "google_pubsub_subscription" "outcomes_to_storage" {
  name                       = "${local.topics.outcomes}-storage"
  topic                      = google_pubsub_topic.outcomes.id
  message_retention_duration = "604800s"
  expiration_policy {
    ttl = ""
  }
  cloud_storage_config {
    bucket          = google_storage_bucket.outcomes.name
    filename_prefix = "outcomes/"
    filename_suffix = ".jsonl"
    max_duration    = "300s"
    max_messages    = 1000
  }
  depends_on = [
    google_storage_bucket_iam_member.pubsub_agent_writes_outcomes,
    google_storage_bucket_iam_member.pubsub_agent_reads_outcomes_bucket,
  ]
}

resource "google_pubsub_subscription" "deadletter_inspect" {
  name                       = "${local.topics.deadletter}-inspect"
  topic                      = google_pubsub_topic.deadletter.id
  message_retention_duration = "604800s"
  expiration_policy {
    ttl = ""
  }
}

# Rides are pushed to the function with an OIDC token. Poison messages are dead-lettered by
# the function itself; this policy bounds redelivery of messages that keep failing otherwise.
resource "google_pubsub_subscription" "function_push" {
  name                 = "${local.topics.push}-function"
  topic                = google_pubsub_topic.push.id
  ack_deadline_seconds = 60
  push_config {
    push_endpoint = google_cloudfunctions2_function.predict.service_config[0].uri
    oidc_token {
      service_account_email = google_service_account.pusher.email
    }
  }
  # Each publish of a ride is tried this many times; the backend publishes a ride at most
  # RESEND_MAX_ATTEMPTS (5) times, so an outage delivers one ride at most 25 times, not 50.
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.deadletter.id
    max_delivery_attempts = 5
  }
  retry_policy {
    minimum_backoff = "5s"
    maximum_backoff = "300s"
  }
  expiration_policy {
    ttl = ""
  }
}

# The shadow revision (a rollout's candidate, or the version riders may go back to during a bake)
# gets a copy of every ride at its tag's URL; it answers into the shadow topic, which riders never see.
# Until a rollout tags a revision `shadow`, the URL does not answer and these copies wait (7 days at most).
resource "google_pubsub_subscription" "function_shadow_push" {
  name                 = "${local.topics.push}-shadow"
  topic                = google_pubsub_topic.push.id
  ack_deadline_seconds = 60
  push_config {
    push_endpoint = replace(google_cloudfunctions2_function.predict.service_config[0].uri, "https://", "https://shadow---")
    oidc_token {
      service_account_email = google_service_account.pusher.email
      audience              = google_cloudfunctions2_function.predict.service_config[0].uri
    }
  }
  message_retention_duration = "600s" # the least Pub/Sub keeps; an older shadow copy judges nothing
  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }
  expiration_policy {
    ttl = ""
  }
}

# The rollout controller's own copies of every answer, refusal and completed ride: its shadow analysis
# and bake pair the two versions' answers to the same rides, and judge them on the actual durations
# that have come back (rollout/analysis.py).
resource "google_pubsub_subscription" "rollout_analysis" {
  for_each                   = { pull = google_pubsub_topic.pull.id, shadow = google_pubsub_topic.shadow.id, deadletter = google_pubsub_topic.deadletter.id, outcomes = google_pubsub_topic.outcomes.id }
  name                       = "${local.prefix}-rollout-analysis-${each.key}"
  topic                      = each.value
  ack_deadline_seconds       = 30
  message_retention_duration = "3600s"
  expiration_policy {
    ttl = ""
  }
}

# --- identities: one per component, no keys ---------------------------------------------------

resource "google_service_account" "function" {
  account_id   = "${local.prefix}-fn"
  display_name = "ridestream serving function"
}

resource "google_service_account" "backend" {
  account_id   = "${local.prefix}-backend"
  display_name = "ridestream backend"
}

resource "google_service_account" "pusher" {
  account_id   = "${local.prefix}-pusher"
  display_name = "ridestream Pub/Sub push to the function"
}

# --- least privilege, on the resources themselves ----------------------------------------------

resource "google_storage_bucket_iam_member" "function_reads_models" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.function.email}"
}

resource "google_pubsub_topic_iam_member" "function_publishes_results" {
  topic  = google_pubsub_topic.pull.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.function.email}"
}

resource "google_pubsub_topic_iam_member" "function_publishes_shadow_answers" {
  topic  = google_pubsub_topic.shadow.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.function.email}"
}

resource "google_pubsub_topic_iam_member" "function_publishes_deadletters" {
  topic  = google_pubsub_topic.deadletter.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.function.email}"
}

resource "google_pubsub_topic_iam_member" "backend_publishes_rides" {
  topic  = google_pubsub_topic.push.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.backend.email}"
}

# /readyz reads the topic and the subscription's metadata.
resource "google_pubsub_topic_iam_member" "backend_views_push_topic" {
  topic  = google_pubsub_topic.push.id
  role   = "roles/pubsub.viewer"
  member = "serviceAccount:${google_service_account.backend.email}"
}

resource "google_pubsub_subscription_iam_member" "backend_reads_results" {
  subscription = google_pubsub_subscription.backend_results.id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${google_service_account.backend.email}"
}

resource "google_pubsub_subscription_iam_member" "backend_views_results" {
  subscription = google_pubsub_subscription.backend_results.id
  role         = "roles/pubsub.viewer"
  member       = "serviceAccount:${google_service_account.backend.email}"
}

resource "google_pubsub_topic_iam_member" "backend_publishes_outcomes" {
  topic  = google_pubsub_topic.outcomes.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.backend.email}"
}

resource "google_pubsub_subscription_iam_member" "backend_reads_shadow_answers" {
  subscription = google_pubsub_subscription.backend_shadow_answers.id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${google_service_account.backend.email}"
}

# The Cloud Storage subscription writes as Pub/Sub's service agent: it creates objects and reads the
# bucket's metadata, nothing else.
resource "google_storage_bucket_iam_member" "pubsub_agent_writes_outcomes" {
  bucket = google_storage_bucket.outcomes.name
  role   = "roles/storage.objectCreator"
  member = local.pubsub_agent
}

resource "google_storage_bucket_iam_member" "pubsub_agent_reads_outcomes_bucket" {
  bucket = google_storage_bucket.outcomes.name
  role   = "roles/storage.legacyBucketReader"
  member = local.pubsub_agent
}

# The flows (training's identity) read the completed rides for live quality.
resource "google_storage_bucket_iam_member" "flows_read_outcomes" {
  bucket = google_storage_bucket.outcomes.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.training.email}"
}

resource "google_cloud_run_v2_service_iam_member" "pusher_invokes_function" {
  location = var.region
  name     = google_cloudfunctions2_function.predict.service_config[0].service
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.pusher.email}"
}

resource "google_pubsub_topic_iam_member" "pubsub_agent_dead_letters" {
  topic  = google_pubsub_topic.deadletter.id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "pubsub_agent_forwards_from_push" {
  subscription = google_pubsub_subscription.function_push.id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

# --- the serving function (2nd gen) ------------------------------------------------------------

data "archive_file" "function" {
  type        = "zip"
  source_dir  = "${path.module}/../serving_function"
  output_path = "${path.module}/.build/serving_function.zip"
  excludes    = ["deploy.py", "__pycache__"]
}

resource "google_storage_bucket_object" "function_source" {
  name   = "serving_function-${data.archive_file.function.output_md5}.zip"
  bucket = google_storage_bucket.function_source.name
  source = data.archive_file.function.output_path
}

resource "google_cloudfunctions2_function" "predict" {
  name       = "${local.prefix}-predict-duration"
  location   = var.region
  depends_on = [google_project_service.apis]

  build_config {
    runtime     = "python311"
    entry_point = "predict_duration_cloudevent"
    source {
      storage_source {
        bucket = google_storage_bucket.function_source.name
        object = google_storage_bucket_object.function_source.name
      }
    }
  }

  service_config {
    available_memory                 = "1Gi"
    available_cpu                    = "1"
    timeout_seconds                  = 60
    max_instance_count               = 20
    max_instance_request_concurrency = 16
    ingress_settings                 = "ALLOW_INTERNAL_ONLY"
    service_account_email            = google_service_account.function.email
    environment_variables = {
      PROJECT_ID                = var.project_id
      RUN_ID                    = var.run_id
      MODEL_URI                 = var.model_uri
      MODEL_VERSION             = var.model_version
      MODEL_BUCKET              = google_storage_bucket.models.name
      BACKEND_PULL_STREAM       = google_pubsub_topic.pull.name
      BACKEND_DEADLETTER_STREAM = google_pubsub_topic.deadletter.name
      OMP_NUM_THREADS           = "1"
    }
  }

  lifecycle {
    # The model served is chosen in the MLflow registry and set by `operations.deploy redeploy`,
    # which owns these three variables after the first apply: Terraform never resets them.
    ignore_changes = [
      service_config[0].environment_variables["RUN_ID"],
      service_config[0].environment_variables["MODEL_URI"],
      service_config[0].environment_variables["MODEL_VERSION"],
    ]
  }
}

# --- the backend's shared result store ----------------------------------------------------------

# The default (memorystore_size_gb = 1). Pending rides and finished results live here, so it must keep
# them: STANDARD_HA replicates to a standby that takes over on failure, and RDB snapshots (hourly,
# Memorystore for Redis' persistence mode) bring the data back after a full restart. noeviction: when
# it is full it refuses writes (the backend answers 503, retry) instead of Memorystore's default
# volatile-lru silently evicting pending rides, which all have a TTL.
resource "google_redis_instance" "results" {
  #checkov:skip=CKV_GCP_97:reached only over the VPC's private IP; TLS would need the server CA distributed to every replica
  count              = var.memorystore_size_gb > 0 ? 1 : 0
  auth_enabled       = true
  name               = "${local.prefix}-results"
  region             = var.region
  tier               = "STANDARD_HA"
  memory_size_gb     = var.memorystore_size_gb
  redis_version      = "REDIS_7_2"
  authorized_network = var.network

  persistence_config {
    persistence_mode    = "RDB"
    rdb_snapshot_period = "ONE_HOUR"
  }
  redis_configs = {
    maxmemory-policy = "noeviction"
  }
}

# --- the backend on Cloud Run ------------------------------------------------------------------

resource "google_cloud_run_v2_service" "backend" {
  name                = "${local.prefix}-backend"
  location            = var.region
  ingress             = "INGRESS_TRAFFIC_ALL"
  deletion_protection = var.deletion_protection
  depends_on          = [google_project_service.apis]

  # Without a shared store every restart, deploy (two revisions overlap) or scale event loses rides:
  # refused unless asked for by name.
  lifecycle {
    precondition {
      condition     = local.shared_store || var.allow_in_memory_results
      error_message = "The backend needs a shared result store or it loses rides: keep memorystore_size_gb > 0 (default 1), set redis_url, or set allow_in_memory_results = true for a throwaway project."
    }
  }

  template {
    service_account = google_service_account.backend.email
    # As many requests as one instance has threads (backend/Dockerfile), so Cloud Run never sends a
    # long poll to an instance with no thread free for it (tests/test_capacity.py ties the two).
    max_instance_request_concurrency = 200
    scaling {
      min_instance_count = 1
      max_instance_count = local.shared_store ? 10 : 1
    }
    # Memorystore has only a private address: reach it through the VPC (Direct VPC egress).
    dynamic "vpc_access" {
      for_each = local.shared_store ? [1] : []
      content {
        egress = "PRIVATE_RANGES_ONLY"
        network_interfaces {
          network    = var.network
          subnetwork = var.subnetwork
        }
      }
    }
    containers {
      image = var.backend_image
      resources {
        cpu_idle = false # the result listener streams between requests
        limits = {
          cpu    = "1"
          memory = "512Mi"
        }
      }
      env {
        name  = "PROJECT_ID"
        value = var.project_id
      }
      env {
        name  = "BACKEND_PUSH_STREAM"
        value = google_pubsub_topic.push.name
      }
      env {
        name  = "BACKEND_PULL_SUBSCRIPTION"
        value = google_pubsub_subscription.backend_results.name
      }
      env {
        name  = "BACKEND_SHADOW_SUBSCRIPTION"
        value = google_pubsub_subscription.backend_shadow_answers.name
      }
      env {
        name  = "BACKEND_OUTCOME_STREAM"
        value = google_pubsub_topic.outcomes.name
      }
      env {
        name  = "REDIS_URL"
        value = local.redis_url
      }
      env {
        name  = "CORS_ALLOWED_ORIGINS"
        value = join(",", var.backend_cors_allowed_origins)
      }
      startup_probe {
        http_get {
          path = "/healthz"
        }
      }
      liveness_probe {
        http_get {
          path = "/healthz"
        }
      }
    }
  }
}

# Riders call the backend: anyone by default (a public API), or only the members given.
resource "google_cloud_run_v2_service_iam_member" "riders_invoke_backend" {
  for_each = toset(var.backend_invokers)
  name     = google_cloud_run_v2_service.backend.name
  location = google_cloud_run_v2_service.backend.location
  role     = "roles/run.invoker"
  member   = each.value
}

# --- the project's APIs -------------------------------------------------------------------------

resource "google_project_service" "apis" {
  for_each = local.apis
  service  = "${each.value}.googleapis.com"
  # Turning an API off on destroy would break whatever else in the project uses it.
  disable_on_destroy = false
}

# --- the MLflow tracking server: the registry training writes and the deploy commands read --------

# Its own database password, kept in Secret Manager; URL-safe, as it goes into a database URI.
resource "random_password" "mlflow_db" {
  length  = 32
  special = false
}

resource "google_sql_database_instance" "mlflow" {
  #checkov:skip=CKV_GCP_60:the public address has no authorized networks; only the Cloud SQL connector (IAM-authorized, TLS) reaches it
  #checkov:skip=CKV_GCP_6:require_ssl is gone from provider 6; ssl_mode = ENCRYPTED_ONLY below is its replacement
  name                = "${local.prefix}-mlflow"
  region              = var.region
  database_version    = "POSTGRES_18"
  deletion_protection = var.deletion_protection
  depends_on          = [google_project_service.apis]

  settings {
    tier              = var.mlflow_db_tier
    availability_type = "ZONAL"
    backup_configuration {
      enabled                        = true
      point_in_time_recovery_enabled = true
    }
    ip_configuration {
      ipv4_enabled = true
      ssl_mode     = "ENCRYPTED_ONLY"
    }
    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }
    database_flags {
      name  = "log_connections"
      value = "on"
    }
    database_flags {
      name  = "log_disconnections"
      value = "on"
    }
    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }
    database_flags {
      name  = "log_min_messages"
      value = "error"
    }
    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }
    database_flags {
      name  = "log_temp_files"
      value = "0"
    }
    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }
    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }
    database_flags {
      name  = "log_hostname"
      value = "on"
    }
    database_flags {
      name  = "log_duration"
      value = "on"
    }
    database_flags {
      name  = "log_statement"
      value = "ddl"
    }
  }
}

resource "google_sql_database" "mlflow" {
  name     = "mlflow"
  instance = google_sql_database_instance.mlflow.name
}

resource "google_sql_user" "mlflow" {
  name     = "mlflow"
  instance = google_sql_database_instance.mlflow.name
  password = random_password.mlflow_db.result
}

# Every secret the system holds, by name; each reader is granted its own (the *_reads_* grants).
locals {
  secret_values = {
    mlflow-db-password = random_password.mlflow_db.result
    # What MLflow encrypts stored webhook secrets with: a Fernet key (32 random bytes, URL-safe base64).
    mlflow-webhook-key = replace(replace(random_bytes.mlflow_webhook_key.base64, "+", "-"), "/", "_")
    # What MLflow signs its webhooks with, and the rollout service checks.
    rollout-webhook-secret = random_password.rollout_webhook.result
  }
}

resource "google_secret_manager_secret" "app" {
  #checkov:skip=CKV_GCP_128:encrypted with Google-managed keys; a customer key is an option, not a need here
  # The names, not the values: for_each may not depend on sensitive values.
  for_each   = toset(["mlflow-db-password", "mlflow-webhook-key", "rollout-webhook-secret"])
  secret_id  = "${local.prefix}-${each.key}"
  depends_on = [google_project_service.apis]
  replication {
    auto {}
  }
}

resource "google_secret_manager_secret_version" "app" {
  for_each    = google_secret_manager_secret.app
  secret      = each.value.id
  secret_data = local.secret_values[each.key]
}

resource "google_service_account" "mlflow" {
  account_id   = "${local.prefix}-mlflow"
  display_name = "ridestream MLflow tracking server"
}

# What training runs as (a CI job, a Prefect worker): it writes models and talks to the server.
resource "google_service_account" "training" {
  account_id   = "${local.prefix}-training"
  display_name = "ridestream training"
}

resource "google_secret_manager_secret_iam_member" "mlflow_reads_db_password" {
  secret_id = google_secret_manager_secret.app["mlflow-db-password"].id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.mlflow.email}"
}

# Cloud SQL grants exist only on the project; the condition narrows this one to the server's own instance.
resource "google_project_iam_member" "mlflow_connects_to_its_database" {
  project = var.project_id
  role    = "roles/cloudsql.client"
  member  = "serviceAccount:${google_service_account.mlflow.email}"
  condition {
    title      = "the MLflow instance only"
    expression = "resource.name == 'projects/${var.project_id}/instances/${google_sql_database_instance.mlflow.name}' && resource.service == 'sqladmin.googleapis.com'"
  }
}

# The UI shows artifacts, plots and models.
resource "google_storage_bucket_iam_member" "mlflow_reads_models" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.mlflow.email}"
}

# Training logs runs and models straight to the bucket (clients write artifacts, not the server).
resource "google_storage_bucket_iam_member" "training_writes_models" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.training.email}"
}

resource "google_cloud_run_v2_service" "mlflow" {
  name                = "${local.prefix}-mlflow"
  location            = var.region
  ingress             = "INGRESS_TRAFFIC_ALL"
  deletion_protection = var.deletion_protection
  depends_on = [
    google_project_service.apis,
    google_secret_manager_secret_iam_member.mlflow_reads_db_password,
    google_secret_manager_secret_iam_member.mlflow_reads_webhook_key,
  ]

  template {
    service_account = google_service_account.mlflow.email
    scaling {
      max_instance_count = 2
    }
    volumes {
      name = "cloudsql"
      cloud_sql_instance {
        instances = [google_sql_database_instance.mlflow.connection_name]
      }
    }
    containers {
      image = var.mlflow_image
      env {
        name  = "CLOUD_SQL_INSTANCE"
        value = google_sql_database_instance.mlflow.connection_name
      }
      env {
        name  = "ARTIFACT_ROOT"
        value = "gs://${google_storage_bucket.models.name}/mlflow"
      }
      env {
        name = "DB_PASSWORD"
        value_source {
          secret_key_ref {
            secret  = google_secret_manager_secret.app["mlflow-db-password"].secret_id
            version = "latest"
          }
        }
      }
      # Webhook secrets are stored encrypted with this key; it must outlive every server instance.
      env {
        name = "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"
        value_source {
          secret_key_ref {
            secret  = google_secret_manager_secret.app["mlflow-webhook-key"].secret_id
            version = "latest"
          }
        }
      }
      volume_mounts {
        name       = "cloudsql"
        mount_path = "/cloudsql"
      }
      resources {
        limits = {
          cpu    = "1"
          memory = "1Gi"
        }
      }
      startup_probe {
        http_get {
          path = "/health"
        }
      }
    }
  }
}

# The server answers only to identities with invoker: training, and the operators named.
resource "google_cloud_run_v2_service_iam_member" "training_uses_mlflow" {
  name     = google_cloud_run_v2_service.mlflow.name
  location = google_cloud_run_v2_service.mlflow.location
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.training.email}"
}

resource "google_cloud_run_v2_service_iam_member" "operators_use_mlflow" {
  for_each = toset(var.mlflow_users)
  name     = google_cloud_run_v2_service.mlflow.name
  location = google_cloud_run_v2_service.mlflow.location
  role     = "roles/run.invoker"
  member   = each.value
}

# --- monitoring: every prediction the function logs, exported to the bucket as JSON ---------

resource "google_logging_project_sink" "predictions" {
  #checkov:skip=CKV2_GCP_4:prediction logs are monitoring data, not audit records; a lifecycle rule keeps them 400 days
  name                   = "${local.prefix}-predictions"
  destination            = "storage.googleapis.com/${google_storage_bucket.prediction_logs.name}"
  filter                 = local.prediction_log_filter
  unique_writer_identity = true
}

# Every ride's prediction line, kept in the _Default bucket as well, would be billed as Logging
# ingestion per GiB: more than Pub/Sub costs from 100 rides/s on (benchmarks/capacity.py). The sink
# above files every line into the bucket; this exclusion, on the _Default sink only, keeps them off
# the ingestion bill. prediction_logs_in_default_bucket = true keeps them in Logs Explorer too.
resource "google_logging_project_exclusion" "predictions_in_bucket_only" {
  count       = var.prediction_logs_in_default_bucket ? 0 : 1
  name        = "${local.prefix}-predictions-in-bucket-only"
  description = "Prediction lines go to the prediction-log bucket (sink ${local.prefix}-predictions), not to the _Default bucket"
  filter      = local.prediction_log_filter
}

resource "google_storage_bucket_iam_member" "sink_writes_prediction_logs" {
  bucket = google_storage_bucket.prediction_logs.name
  role   = "roles/storage.objectCreator"
  member = google_logging_project_sink.predictions.writer_identity
}

# --- live quality: production worse live than on its test month ---------------------------------
# The hourly live-quality flow (flows/live_quality_flow.py, a Cloud Run job of the Prefect work pool)
# logs LIVE QUALITY DEGRADED and fails when production's live RMSE, over a window of enough completed
# rides, is above its test RMSE by more than ALERT_RMSE_INCREASE. That line is counted and alerts.
resource "google_logging_metric" "live_quality_degraded" {
  name   = "${local.prefix}-live-quality-degraded"
  filter = "resource.type=\"cloud_run_job\" AND textPayload:\"LIVE QUALITY DEGRADED\""
  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
  }
  depends_on = [google_project_service.apis]
}

resource "google_monitoring_alert_policy" "live_quality_degraded" {
  display_name          = "ridestream ${var.env}: production is worse live than on its test month"
  combiner              = "OR"
  notification_channels = var.alert_notification_channels
  conditions {
    display_name = "the live-quality flow logged LIVE QUALITY DEGRADED"
    condition_threshold {
      filter          = "metric.type=\"logging.googleapis.com/user/${google_logging_metric.live_quality_degraded.name}\" AND resource.type=\"cloud_run_job\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_SUM"
      }
    }
  }
  alert_strategy {
    auto_close = "86400s"
  }
  documentation {
    mime_type = "text/markdown"
    content   = "Production's live RMSE on completed rides is above its test RMSE by more than the allowed share. The flow run's `live-quality` artifact names the version and the figures; the README's *Live quality* section says what to do (roll back with `make rollback`, or retrain)."
  }
}

# --- rollout: the registry's production alias moves, the function follows ----------------------
# MLflow calls the rollout service (a signed webhook) when an alias moves, and it reads the registry
# every minute besides; it takes a new production version through pre-flight, shadow analysis,
# switch and bake, as revisions and traffic of the function's Cloud Run service (rollout/).

resource "random_password" "rollout_webhook" {
  length  = 48
  special = false
}

resource "random_bytes" "mlflow_webhook_key" {
  length = 32
}

resource "google_secret_manager_secret_iam_member" "mlflow_reads_webhook_key" {
  secret_id = google_secret_manager_secret.app["mlflow-webhook-key"].id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.mlflow.email}"
}

resource "google_service_account" "rollout" {
  account_id   = "${local.prefix}-rollout"
  display_name = "ridestream rollout (redeploys the serving function)"
}

resource "google_secret_manager_secret_iam_member" "rollout_reads_webhook_secret" {
  secret_id = google_secret_manager_secret.app["rollout-webhook-secret"].id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.rollout.email}"
}

# It changes which model serves (revisions and traffic of the function's Cloud Run service) and
# nothing else: the role is granted on that one service. No source upload, no build (rollout/cloud.py).
resource "google_cloud_run_v2_service_iam_member" "rollout_updates_function_revisions" {
  location = var.region
  name     = google_cloudfunctions2_function.predict.service_config[0].service
  role     = "roles/run.developer"
  member   = "serviceAccount:${google_service_account.rollout.email}"
}

# A new revision runs as the function's own identity: the rollout may act as that one only.
resource "google_service_account_iam_member" "rollout_acts_as_function" {
  service_account_id = google_service_account.function.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.rollout.email}"
}

# Pre-flight loads the candidate from the models bucket (rollout/app.py -> serving_function/model_store.py).
resource "google_storage_bucket_iam_member" "rollout_reads_models" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.rollout.email}"
}

# It reads its own copies of the answers and the dead letters, and nothing else of the streams.
resource "google_pubsub_subscription_iam_member" "rollout_reads_analysis" {
  for_each     = google_pubsub_subscription.rollout_analysis
  subscription = each.value.id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${google_service_account.rollout.email}"
}

# It reads the registry (aliases, versions) as a client of the MLflow server.
resource "google_cloud_run_v2_service_iam_member" "rollout_uses_mlflow" {
  name     = google_cloud_run_v2_service.mlflow.name
  location = google_cloud_run_v2_service.mlflow.location
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.rollout.email}"
}

resource "google_cloud_run_v2_service" "rollout" {
  name                = "${local.prefix}-rollout"
  location            = var.region
  ingress             = "INGRESS_TRAFFIC_ALL"
  deletion_protection = var.deletion_protection
  depends_on          = [google_project_service.apis, google_secret_manager_secret_iam_member.rollout_reads_webhook_secret]

  template {
    service_account = google_service_account.rollout.email
    # Exactly one controller, always on: rollouts are serialized in it, its resync runs whether or
    # not a webhook arrives, its analysis reads the streams between requests, and it remembers
    # deliveries against replays. What a rollout must survive a restart is in the registry.
    scaling {
      min_instance_count = 1
      max_instance_count = 1
    }
    # A deploy takes minutes; the worker thread must keep its CPU between requests.
    timeout = "900s"
    containers {
      image = var.rollout_image
      # production: the revision with the traffic; challenger: the revision tagged shadow, of the same service.
      env {
        name  = "ROLLOUT_ALIASES"
        value = "production=${local.function_service_name},challenger=${local.function_service_name}"
      }
      env {
        name  = "BACKEND_PULL_STREAM"
        value = google_pubsub_topic.pull.name
      }
      env {
        name  = "BACKEND_SHADOW_STREAM"
        value = google_pubsub_topic.shadow.name
      }
      env {
        name  = "ANALYSIS_RESULT_SUBSCRIPTIONS"
        value = "${google_pubsub_subscription.rollout_analysis["pull"].name},${google_pubsub_subscription.rollout_analysis["shadow"].name}"
      }
      env {
        name  = "ANALYSIS_DEADLETTER_SUBSCRIPTION"
        value = google_pubsub_subscription.rollout_analysis["deadletter"].name
      }
      env {
        name  = "ANALYSIS_OUTCOME_SUBSCRIPTION"
        value = google_pubsub_subscription.rollout_analysis["outcomes"].name
      }
      env {
        name  = "MLFLOW_TRACKING_URI"
        value = google_cloud_run_v2_service.mlflow.uri
      }
      # The MLflow server checks a Google ID token for this audience (its run.invoker grant below).
      env {
        name  = "MLFLOW_ID_TOKEN_AUDIENCE"
        value = google_cloud_run_v2_service.mlflow.uri
      }
      env {
        name  = "GCP_PROJECT"
        value = var.project_id
      }
      env {
        name  = "GCP_REGION"
        value = var.region
      }
      env {
        name = "ROLLOUT_WEBHOOK_SECRET"
        value_source {
          secret_key_ref {
            secret  = google_secret_manager_secret.app["rollout-webhook-secret"].secret_id
            version = "latest"
          }
        }
      }
      resources {
        cpu_idle = false
        limits = {
          cpu    = "1"
          memory = "1Gi"
        }
      }
      startup_probe {
        http_get {
          path = "/healthz"
        }
      }
    }
  }
}

# MLflow's webhooks carry no Google identity: the service is public, and every call must carry a
# valid HMAC signature of a fresh, first delivery (rollout/webhook.py), or it is refused with 401.
resource "google_cloud_run_v2_service_iam_member" "mlflow_webhooks_reach_rollout" {
  #checkov:skip=CKV_GCP_102:webhooks cannot authenticate with Google identities; the service verifies an HMAC signature on every call
  name     = google_cloud_run_v2_service.rollout.name
  location = google_cloud_run_v2_service.rollout.location
  role     = "roles/run.invoker"
  member   = "allUsers"
}
