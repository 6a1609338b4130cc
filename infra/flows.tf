# --- the flows: Cloud Run jobs from one image, started by Cloud Scheduler ----------------------------
# `python -m flows.job <flow>` (flows/job.py) from var.flows_image (flows/Dockerfile). Each job runs as the
# training identity, which already writes models, reads the completed rides and uses the MLflow server;
# it may also read the prediction lines (below). docs/flows-in-the-cloud.md says what runs when.

locals {
  # The trip months training and the drift reference read (<color>_tripdata_<YYYY-MM>.parquet): a gs:// prefix,
  # as training lists it to find the newest three months.
  trip_data = var.trip_data != "" ? var.trip_data : "gs://${google_storage_bucket.models.name}/trip-data"
  # What every flow needs to reach the registry: the server's URL, and the audience of the ID token the job
  # fetches for it (Cloud Run IAM checks it; the job's identity holds run.invoker on the server).
  flows_mlflow_env = {
    MLFLOW_TRACKING_URI      = google_cloud_run_v2_service.mlflow.uri
    MLFLOW_ID_TOKEN_AUDIENCE = google_cloud_run_v2_service.mlflow.uri
    MLFLOW_ARTIFACT_ROOT     = "gs://${google_storage_bucket.models.name}/mlflow"
    TRIP_DATA_BASE           = local.trip_data
  }
}

# The daily drift report reads yesterday's prediction lines from the sink's bucket.
resource "google_storage_bucket_iam_member" "flows_read_prediction_logs" {
  bucket = google_storage_bucket.prediction_logs.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.training.email}"
}

# One job per flow, each `python -m flows.job <argument>` with its own limits and environment beside the
# registry's (flows_mlflow_env).
resource "google_cloud_run_v2_job" "flows" {
  for_each = {
    # Weekly: train on the newest three months under TRIP_DATA_BASE, register, and promote only if better
    # than production (the rollout controller then takes the new production version to riders). Three
    # months (~200k rides) train in under 30 s of CPU; pandas and the trials' models need the memory. A
    # second try covers a passing fault (a download, the registry); promotion is gated anyway.
    training = {
      argument = "training", cpu = "2", memory = "4Gi", timeout = "1800s", max_retries = 1
      env      = { TRAINING_TRIALS = tostring(var.training_trials) }
    }
    # Daily: yesterday's prediction lines (the sink's bucket) against the month production was trained on;
    # a day of them at the default maximum rate, parsed by pandas and Evidently, needs the memory.
    monitoring = {
      argument = "monitoring", cpu = "2", memory = "8Gi", timeout = "1800s", max_retries = 1
      env      = { PREDICTION_LOGS = "gs://${google_storage_bucket.prediction_logs.name}" }
    }
    # Hourly: each version's live quality on the completed rides, into its training run; it logs
    # LIVE QUALITY DEGRADED and exits 1 when production is worse live than on its test month (the alert
    # in observability.tf matches that line). No retry: it would judge the same rides again, and the next
    # hour's run comes anyway.
    live_quality = {
      argument = "live-quality", cpu = "1", memory = "2Gi", timeout = "900s", max_retries = 0
      env      = { OUTCOMES_URI = "gs://${google_storage_bucket.outcomes.name}/outcomes/" }
    }
  }
  name                = "${local.prefix}-${replace(each.key, "_", "-")}"
  location            = var.region
  deletion_protection = false # a job holds no data: its runs are in MLflow, its logs in Cloud Logging
  depends_on = [
    google_cloud_run_v2_service_iam_member.training_uses_mlflow,
    google_storage_bucket_iam_member.flows_read_prediction_logs,
    google_storage_bucket_iam_member.flows_read_outcomes,
  ]

  template {
    task_count = 1
    template {
      service_account = google_service_account.training.email
      timeout         = each.value.timeout
      max_retries     = each.value.max_retries
      containers {
        image = var.flows_image
        args  = [each.value.argument]
        dynamic "env" {
          for_each = merge(local.flows_mlflow_env, each.value.env)
          content {
            name  = env.key
            value = env.value
          }
        }
        resources {
          limits = {
            cpu    = each.value.cpu
            memory = each.value.memory
          }
        }
      }
    }
  }
}

# --- the schedules -------------------------------------------------------------------------------------
# Cloud Scheduler calls the Cloud Run Admin API's jobs:run with an OAuth token of its own identity, which
# may run these three jobs and do nothing else: roles/run.invoker holds run.jobs.run, granted on each job.

resource "google_service_account" "scheduler" {
  account_id   = "${local.prefix}-scheduler"
  display_name = "ridestream Cloud Scheduler (starts the flows' jobs)"
}

resource "google_cloud_run_v2_job_iam_member" "scheduler_runs_flows" {
  for_each = google_cloud_run_v2_job.flows
  name     = each.value.name
  location = each.value.location
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.scheduler.email}"
}

resource "google_cloud_scheduler_job" "flows" {
  for_each  = google_cloud_run_v2_job.flows
  name      = each.value.name
  region    = var.region
  schedule  = var.flows_schedules[each.key]
  time_zone = var.flows_time_zone
  # The API answers as soon as the execution starts; the job's own retries cover a failed run.
  attempt_deadline = "60s"
  retry_config {
    retry_count = 1
  }
  http_target {
    http_method = "POST"
    uri         = "https://run.googleapis.com/v2/projects/${var.project_id}/locations/${var.region}/jobs/${each.value.name}:run"
    oauth_token {
      service_account_email = google_service_account.scheduler.email
      scope                 = "https://www.googleapis.com/auth/cloud-platform"
    }
  }
  depends_on = [google_cloud_run_v2_job_iam_member.scheduler_runs_flows]
}
