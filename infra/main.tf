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
  # Cloud Run log entries name their service by its short name, which is the function's service name.
  function_service_name = google_cloud_run_v2_service.predict.name
  # The function's prediction lines (production's and the shadow's: revisions of the one service).
  prediction_log_filter = "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=\"${local.function_service_name}\" AND jsonPayload.message=\"prediction\""
  # Whether the replicas share a store, decided without the (sensitive) URL: for_each and count
  # may not depend on sensitive values.
  shared_store = var.memorystore_size_gb > 0 || var.redis_url != ""
  # A public rider API: Cloud Run's invoker check off instead of an allUsers binding.
  public_backend = contains(var.backend_invokers, "allUsers")
  redis_url      = var.memorystore_size_gb > 0 ? "redis://:${google_redis_instance.results[0].auth_string}@${google_redis_instance.results[0].host}:${google_redis_instance.results[0].port}/0" : var.redis_url
}

# The APIs every resource here needs are enabled by infra/bootstrap (root 1), applied first.
data "google_project" "this" {}

# Every name the project id enters, checked against Google's limit before anything is created: a bucket
# name is 3-63 characters (https://cloud.google.com/storage/docs/buckets#naming). The names that hold only
# env are kept within their limits by env's own validation (variables.tf).
locals {
  buckets = {
    models          = "${var.project_id}-ridestream-${var.env}-models"
    function_source = "${var.project_id}-ridestream-${var.env}-function-source"
    prediction_logs = "${var.project_id}-ridestream-${var.env}-prediction-logs"
    outcomes        = "${var.project_id}-ridestream-${var.env}-outcomes"
  }
}

resource "terraform_data" "name_limits" {
  lifecycle {
    precondition {
      condition     = alltrue([for name in values(local.buckets) : length(name) <= 63])
      error_message = "Bucket names are at most 63 characters: ${join(", ", [for name in values(local.buckets) : "${name} (${length(name)})" if length(name) > 63])}. Choose a shorter env."
    }
  }
}

# --- storage -----------------------------------------------------------------------------------

resource "google_storage_bucket" "models" {
  #checkov:skip=CKV_GCP_62:object access is recorded by Cloud Audit Logs (Data Access); legacy usage-log buckets add nothing
  name                        = local.buckets.models
  depends_on                  = [terraform_data.name_limits]
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
  name                        = local.buckets.function_source
  depends_on                  = [terraform_data.name_limits]
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
}

resource "google_storage_bucket" "prediction_logs" {
  #checkov:skip=CKV_GCP_62:object access is recorded by Cloud Audit Logs (Data Access); legacy usage-log buckets add nothing
  #checkov:skip=CKV_GCP_78:the sink only appends new objects and a lifecycle rule deletes them; nothing is overwritten
  name                        = local.buckets.prediction_logs
  depends_on                  = [terraform_data.name_limits]
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
  name                        = local.buckets.outcomes
  depends_on                  = [terraform_data.name_limits]
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
    push_endpoint = google_cloud_run_v2_service.predict.uri
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
    push_endpoint = replace(google_cloud_run_v2_service.predict.uri, "https://", "https://shadow---")
    oidc_token {
      service_account_email = google_service_account.pusher.email
      audience              = google_cloud_run_v2_service.predict.uri
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
  name     = google_cloud_run_v2_service.predict.name
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

# --- the serving function: a Cloud Run function ------------------------------------------------
# Google's current form of a 2nd-gen function: a Cloud Run service built from the function's source
# (build_config). Terraform creates it, serving no model (main.py refuses rides for redelivery until then);
# from then on the rollout controller alone makes its revisions and moves its traffic (rollout/cloud.py).

# Reproducible: every file archived with one mode, whatever the umask of the machine that zips it, and the
# object named by the zip's content hash, so the same code is the same object.
data "archive_file" "function" {
  type             = "zip"
  source_dir       = "${path.module}/../serving_function"
  output_path      = "${path.module}/.build/serving_function.zip"
  output_file_mode = "0644"
  excludes         = ["deploy.py", "__pycache__"]
}

resource "google_storage_bucket_object" "function_source" {
  name   = "serving_function-${data.archive_file.function.output_sha256}.zip"
  bucket = google_storage_bucket.function_source.name
  source = data.archive_file.function.output_path
}

# Builds run as the dedicated build account of infra/bootstrap: it reads the source here, nothing else of
# the system (its log writing and image pushing are granted in bootstrap).
resource "google_storage_bucket_iam_member" "build_reads_function_source" {
  bucket = google_storage_bucket.function_source.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${var.build_service_account}"
}


resource "google_cloud_run_v2_service" "predict" {
  name     = "${local.prefix}-predict-duration"
  location = var.region
  # Pub/Sub push counts as internal traffic (https://cloud.google.com/run/docs/securing/ingress).
  ingress             = "INGRESS_TRAFFIC_INTERNAL_ONLY"
  deletion_protection = var.deletion_protection
  depends_on          = [google_storage_bucket_iam_member.build_reads_function_source]

  # What makes this a Cloud Run function in the console and for `gcloud run deploy --function`: the entry point
  # Pub/Sub push reaches (serving_function/main.py) and its source. It starts no build (the provider sends it as
  # the service's record: hashicorp/terraform-provider-google#22263): the image is var.function_image, built
  # by `make gcp-up` from the same folder with the same buildpacks (operations/cloudbuild-function.yaml).
  build_config {
    function_target = "predict_duration_cloudevent"
    source_location = "gs://${google_storage_bucket.function_source.name}/${google_storage_bucket_object.function_source.name}"
    service_account = "projects/${var.project_id}/serviceAccounts/${var.build_service_account}"
  }

  template {
    service_account                  = google_service_account.function.email
    max_instance_request_concurrency = 16
    timeout                          = "60s"
    scaling {
      max_instance_count = 20
    }
    containers {
      image = var.function_image
      resources {
        limits = {
          cpu    = "1"
          memory = "1Gi"
        }
      }
      # No RUN_ID or MODEL_URI: the controller gives each revision its model.
      dynamic "env" {
        for_each = {
          PROJECT_ID                = var.project_id
          MODEL_BUCKET              = google_storage_bucket.models.name
          BACKEND_PULL_STREAM       = google_pubsub_topic.pull.name
          BACKEND_DEADLETTER_STREAM = google_pubsub_topic.deadletter.name
          OMP_NUM_THREADS           = "1"
        }
        content {
          name  = env.key
          value = env.value
        }
      }
    }
  }

  lifecycle {
    # Terraform creates the service and never touches it again: revisions and traffic belong to the rollout
    # controller (its gcloud updates set client and client_version), and a changed code zip or a second
    # apply rebuilds nothing (a code change is deployed on purpose: docs/deploy-gcp-infra.md).
    ignore_changes = [template, traffic, client, client_version, build_config]
  }
}

# --- the network: the system's own, unless one is named ---------------------------------------------
# Memorystore has only a private address, and the backend reaches it through Direct VPC egress. Hardened
# projects have no `default` network, so the system makes its own (var.network = "" by default).

resource "google_compute_network" "vpc" {
  #checkov:skip=CKV2_GCP_18:a new network's implied rules deny all ingress and allow egress; nothing on it listens (Direct VPC egress and Memorystore's peering only)
  count                   = var.network == "" ? 1 : 0
  name                    = "${local.prefix}-vpc"
  auto_create_subnetworks = false
}

resource "google_compute_subnetwork" "backend" {
  count                    = var.network == "" ? 1 : 0
  name                     = "${local.prefix}-backend"
  region                   = var.region
  network                  = google_compute_network.vpc[0].id
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true
  log_config {
    aggregation_interval = "INTERVAL_10_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

locals {
  network    = var.network == "" ? google_compute_network.vpc[0].id : var.network
  subnetwork = var.network == "" ? google_compute_subnetwork.backend[0].id : var.subnetwork
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
  authorized_network = local.network

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
  name     = "${local.prefix}-backend"
  location = var.region
  # Behind the edge (infra/edge.tf), only through its load balancer: Cloud Armor sees every request.
  ingress             = local.edge ? "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER" : "INGRESS_TRAFFIC_ALL"
  deletion_protection = var.deletion_protection
  # Public (the default): Cloud Run's invoker check off, which Domain Restricted Sharing allows where an
  # allUsers binding is refused (https://cloud.google.com/run/docs/authenticating/public).
  invoker_iam_disabled = local.public_backend
  # It reads the store's URL (with its AUTH string) from Secret Manager at start.
  depends_on = [google_secret_manager_secret_version.app, google_secret_manager_secret_iam_member.backend_reads_redis_url]

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
          network    = local.network
          subnetwork = local.subnetwork
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
      # The URL holds the Memorystore AUTH string: read from Secret Manager, never in the service's configuration.
      dynamic "env" {
        for_each = local.shared_store ? [1] : []
        content {
          name = "REDIS_URL"
          value_source {
            secret_key_ref {
              secret  = google_secret_manager_secret.app["redis-url"].secret_id
              version = "latest"
            }
          }
        }
      }
      env {
        name  = "CORS_ALLOWED_ORIGINS"
        value = join(",", var.backend_cors_allowed_origins)
      }
      # Who appended the client's address to X-Forwarded-For (backend/limits.py): Cloud Run's front end, and
      # before it the edge's load balancer when there is one.
      env {
        name  = "TRUSTED_PROXY_HOPS"
        value = local.edge ? "2" : "1"
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

# Riders call the backend: anyone by default (a public API: the invoker check is off, above), or only the
# members given.
resource "google_cloud_run_v2_service_iam_member" "riders_invoke_backend" {
  for_each = toset([for member in var.backend_invokers : member if member != "allUsers"])
  name     = google_cloud_run_v2_service.backend.name
  location = google_cloud_run_v2_service.backend.location
  role     = "roles/run.invoker"
  member   = each.value
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

  settings {
    # From PostgreSQL 16 on an instance without an edition is Enterprise Plus, which refuses the shared-core
    # tiers ("Invalid Tier (db-g1-small) for (ENTERPRISE_PLUS) Edition"): Enterprise takes them.
    edition           = "ENTERPRISE"
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
    # The backend replicas' shared store, with the Memorystore AUTH string in it.
    redis-url = local.redis_url
  }
}

resource "google_secret_manager_secret" "app" {
  #checkov:skip=CKV_GCP_128:encrypted with Google-managed keys; a customer key is an option, not a need here
  # The names, not the values: for_each may not depend on sensitive values.
  for_each  = toset(concat(["mlflow-db-password", "mlflow-webhook-key", "rollout-webhook-secret"], local.shared_store ? ["redis-url"] : []))
  secret_id = "${local.prefix}-${each.key}"
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

# The rollout controller reads it too: its lease lives there (rollout/lease.py).
resource "google_secret_manager_secret_iam_member" "rollout_reads_redis_url" {
  count     = local.shared_store ? 1 : 0
  secret_id = google_secret_manager_secret.app["redis-url"].id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.rollout.email}"
}

# The backend reads the store's URL, its one secret.
resource "google_secret_manager_secret_iam_member" "backend_reads_redis_url" {
  count     = local.shared_store ? 1 : 0
  secret_id = google_secret_manager_secret.app["redis-url"].id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.backend.email}"
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
  # A revision reads its secrets at start: the versions must exist, and the right to read them.
  depends_on = [
    google_secret_manager_secret_version.app["mlflow-db-password"],
    google_secret_manager_secret_version.app["mlflow-webhook-key"],
    google_secret_manager_secret_iam_member.mlflow_reads_db_password,
    google_secret_manager_secret_iam_member.mlflow_reads_webhook_key,
    # mlflow server opens its store at start: its database, its user and the right to connect first, or the
    # first revision exits and the apply fails.
    google_sql_database.mlflow,
    google_sql_user.mlflow,
    google_project_iam_member.mlflow_connects_to_its_database,
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
  name     = google_cloud_run_v2_service.predict.name
  role     = "roles/run.developer"
  member   = "serviceAccount:${google_service_account.rollout.email}"
}

# `gcloud run revisions list --service=S` (rollout/cloud.py) calls the v1 API's namespaces.revisions.list on
# namespaces/PROJECT with a label selector for the service (gcloud's surface/run/revisions/list.py ->
# serverless_operations.ListRevisions): run.revisions.list is checked on the project, so the service-level
# run.developer above does not hold it. roles/run.viewer is the narrowest predefined role with
# run.revisions.list (https://cloud.google.com/iam/docs/roles-permissions/run); it reads, never changes.
resource "google_project_iam_member" "rollout_lists_revisions" {
  project = var.project_id
  role    = "roles/run.viewer"
  member  = "serviceAccount:${google_service_account.rollout.email}"
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
  # MLflow's webhooks carry no Google identity: the service is public (the invoker check off, which Domain
  # Restricted Sharing allows where an allUsers binding is refused), and every call must carry a valid HMAC
  # signature of a fresh, first delivery (rollout/webhook.py), or it is refused with 401.
  invoker_iam_disabled = true
  depends_on = [
    google_secret_manager_secret_version.app["rollout-webhook-secret"],
    google_secret_manager_secret_iam_member.rollout_reads_webhook_secret,
  ]

  template {
    service_account = google_service_account.rollout.email
    # One controller, always on: rollouts are serialized in it, its resync runs whether or
    # not a webhook arrives, its analysis reads the streams between requests, and it remembers
    # deliveries against replays. What a rollout must survive a restart is in the registry.
    # The instance limit is per revision, so a deploy of the controller overlaps two: the one that
    # holds the lease in Memorystore acts and reads (rollout/lease.py).
    scaling {
      min_instance_count = 1
      max_instance_count = 1
    }
    dynamic "vpc_access" {
      for_each = local.shared_store ? [1] : []
      content {
        egress = "PRIVATE_RANGES_ONLY"
        network_interfaces {
          network    = local.network
          subnetwork = local.subnetwork
        }
      }
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
      # The lease's store: the backend's Memorystore (its URL holds the AUTH string: from Secret Manager), under
      # a key of the controller's own. Without a shared store (a throwaway project) it is alone by configuration.
      dynamic "env" {
        for_each = local.shared_store ? [1] : []
        content {
          name = "ROLLOUT_LEASE_REDIS_URL"
          value_source {
            secret_key_ref {
              secret  = google_secret_manager_secret.app["redis-url"].secret_id
              version = "latest"
            }
          }
        }
      }
      env {
        name  = "ROLLOUT_LEASE_KEY"
        value = "${local.prefix}:rollout:lease"
      }
      env {
        name  = "ROLLOUT_SINGLE_INSTANCE"
        value = local.shared_store ? "false" : "true"
      }
      # Who may see /status's and /readyz's details (an ID token for the service's URL with one of these e-mails).
      env {
        name  = "ROLLOUT_OPERATORS"
        value = join(",", var.rollout_operators)
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
