# What operations/gcp.py reads (it never falls back on local defaults): the names and addresses of the system.

output "project_id" {
  value = var.project_id
}

output "region" {
  value = var.region
}

output "function_service" {
  description = "The Cloud Run service of the serving function: its revisions and traffic belong to the rollout controller"
  value       = google_cloud_run_v2_service.predict.name
}

# Behind the edge the service takes the load balancer's traffic only: riders (and the smoke test) use the domain.
output "backend_url" {
  value = local.edge ? "https://${var.edge_domain}" : google_cloud_run_v2_service.backend.uri
}

output "mlflow_url" {
  description = "MLFLOW_TRACKING_URI for training and the deploy commands (send an identity token, or use gcloud run services proxy)"
  value       = google_cloud_run_v2_service.mlflow.uri
}

output "mlflow_service" {
  value = google_cloud_run_v2_service.mlflow.name
}

output "rollout_url" {
  value = google_cloud_run_v2_service.rollout.uri
}

output "rollout_service" {
  value = google_cloud_run_v2_service.rollout.name
}

output "rollout_webhook_url" {
  description = "Register it once: python -m rollout register --url <this> (ROLLOUT_WEBHOOK_SECRET from Secret Manager)"
  value       = "${google_cloud_run_v2_service.rollout.uri}/webhooks/mlflow"
}

output "topics" {
  value = local.topics
}

output "model_bucket" {
  value = "gs://${google_storage_bucket.models.name}"
}

output "function_source_bucket" {
  value = "gs://${google_storage_bucket.function_source.name}"
}

output "service_accounts" {
  value = {
    function = google_service_account.function.email
    backend  = google_service_account.backend.email
    pusher   = google_service_account.pusher.email
    mlflow   = google_service_account.mlflow.email
    training = google_service_account.training.email
    rollout  = google_service_account.rollout.email
  }
}

output "outcomes" {
  description = "Where the completed rides land (newline-delimited JSON), read by the monitoring flow as OUTCOMES_URI"
  value       = "gs://${google_storage_bucket.outcomes.name}/outcomes/"
}

output "prediction_logs" {
  value = "gs://${google_storage_bucket.prediction_logs.name}"
}

output "deletion_protected" {
  description = "Resources that refuse to be destroyed while deletion_protection is true: set it false and apply before destroying"
  value = var.deletion_protection ? [
    "google_cloud_run_v2_service.predict",
    "google_cloud_run_v2_service.backend",
    "google_cloud_run_v2_service.mlflow",
    "google_cloud_run_v2_service.rollout",
    "google_sql_database_instance.mlflow",
  ] : []
}

output "jobs" {
  description = "The flows' Cloud Run jobs (gcloud run jobs execute NAME --region REGION --wait runs one now)"
  value       = { for key, job in google_cloud_run_v2_job.flows : key => job.name }
}

output "dashboard" {
  description = "The operator's Cloud Monitoring dashboard (console: Monitoring > Dashboards)"
  value       = google_monitoring_dashboard.operations.id
}

# With the edge on (infra/edge.tf): the address edge_domain's DNS record points at.
output "edge_address" {
  value = local.edge ? google_compute_global_address.edge[0].address : null
}
