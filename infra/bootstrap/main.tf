locals {
  prefix = "ridestream-${var.env}"
  # Every API the system (infra/) and this root use. cloudresourcemanager and serviceusage come first in
  # need: Terraform reads the project and enables the others through them.
  apis = toset([
    "cloudresourcemanager", "serviceusage", "iam", "run", "cloudbuild", "artifactregistry", "pubsub", "storage",
    "logging", "monitoring", "sqladmin", "secretmanager", "redis", "compute", "cloudscheduler",
  ])
}

resource "google_project_service" "apis" {
  for_each = local.apis
  service  = "${each.value}.googleapis.com"
  # Turning an API off on destroy would break whatever else in the project uses it.
  disable_on_destroy = false
}

# The images the system runs (backend, mlflow, rollout, flows; the function's own build too).
resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:images are encrypted at rest with Google-managed keys; a customer key (kms_key_name) is an option, not a need here
  repository_id = local.prefix
  location      = var.region
  format        = "DOCKER"
  description   = "ridestream ${var.env} images, built by Cloud Build"
  depends_on    = [google_project_service.apis["artifactregistry"]]
}

# What Cloud Build runs as for the images and for the function's source build: since mid-2024 a build
# otherwise runs as the Compute Engine default account, which secure-by-default organizations leave
# without roles (https://cloud.google.com/build/docs/cloud-build-service-account-updates).
resource "google_service_account" "build" {
  account_id   = "${local.prefix}-build"
  display_name = "ridestream ${var.env} builds (Cloud Build)"
  depends_on   = [google_project_service.apis["iam"]]
}

# A build writes its log; Cloud Build refuses a user-specified account that cannot, unless the build
# says where logs go. Logging grants exist on the project only.
resource "google_project_iam_member" "build_writes_logs" {
  project    = var.project_id
  role       = "roles/logging.logWriter"
  member     = "serviceAccount:${google_service_account.build.email}"
  depends_on = [google_project_service.apis["cloudresourcemanager"], google_project_service.apis["logging"]]
}

# It pushes the images it builds to this one repository. (Reading the function's source is granted in the
# system root, on its bucket.)
resource "google_artifact_registry_repository_iam_member" "build_pushes_images" {
  project    = google_artifact_registry_repository.images.project
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.writer"
  member     = "serviceAccount:${google_service_account.build.email}"
  depends_on = [google_project_service.apis["artifactregistry"]]
}

# Where `make gcp-up` uploads each build's source (gcloud builds submit --gcs-source-staging-dir): a user-specified
# build account cannot read Cloud Build's default <project>_cloudbuild bucket, so its builds would fail fetching
# their source. Sources are a copy of a git tree: kept a week, never versioned.
resource "google_storage_bucket" "build_source" {
  #checkov:skip=CKV_GCP_62:object access is recorded by Cloud Audit Logs (Data Access); legacy usage-log buckets add nothing
  #checkov:skip=CKV_GCP_78:build sources are copies of a git tree: old versions would only cost storage
  name                        = "${var.project_id}-${local.prefix}-build-source"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true
  depends_on                  = [google_project_service.apis["storage"]]
  lifecycle_rule {
    condition {
      age = 7
    }
    action {
      type = "Delete"
    }
  }
}

resource "google_storage_bucket_iam_member" "build_reads_its_sources" {
  bucket     = google_storage_bucket.build_source.name
  role       = "roles/storage.objectViewer"
  member     = "serviceAccount:${google_service_account.build.email}"
  depends_on = [google_project_service.apis["storage"]]
}
