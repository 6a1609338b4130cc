output "artifact_registry" {
  description = "Where images go: REGION-docker.pkg.dev/PROJECT/REPOSITORY"
  value       = "${google_artifact_registry_repository.images.location}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "build_service_account" {
  description = "What builds run as: the system root's var.build_service_account"
  value       = google_service_account.build.email
}

output "apis" {
  description = "The APIs enabled, which the system root relies on"
  value       = sort([for api in google_project_service.apis : api.service])
}

output "build_source_bucket" {
  description = "Where each build's source is uploaded (gcloud builds submit --gcs-source-staging-dir), readable by the build account"
  value       = google_storage_bucket.build_source.name
}
