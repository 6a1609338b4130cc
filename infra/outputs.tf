output "model_bucket" {
  value = "gs://${google_storage_bucket.models.name}"
}

output "topics" {
  value = local.topics
}

output "function_uri" {
  value = google_cloudfunctions2_function.predict.service_config[0].uri
}

output "backend_url" {
  value = google_cloud_run_v2_service.backend.uri
}

output "outcomes" {
  description = "Where the completed rides land (newline-delimited JSON), read by the monitoring flow as OUTCOMES_URI"
  value       = "gs://${google_storage_bucket.outcomes.name}/outcomes/"
}

output "prediction_logs" {
  value = "gs://${google_storage_bucket.prediction_logs.name}"
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

output "mlflow_url" {
  description = "MLFLOW_TRACKING_URI for training and the deploy commands (send an identity token: see the README)"
  value       = google_cloud_run_v2_service.mlflow.uri
}

output "rollout_webhook_url" {
  description = "Register it once: python -m rollout register --url <this> (ROLLOUT_WEBHOOK_SECRET from Secret Manager)"
  value       = "${google_cloud_run_v2_service.rollout.uri}/webhooks/mlflow"
}

output "jobs" {
  description = "The flows' Cloud Run jobs (gcloud run jobs execute NAME --region REGION --wait runs one now)"
  value       = { for key, job in google_cloud_run_v2_job.flows : key => job.name }
}

output "dashboard" {
  description = "The operator's Cloud Monitoring dashboard (console: Monitoring > Dashboards)"
  value       = google_monitoring_dashboard.operations.id
}
