# Root 2 of 2, the system: applied after infra/bootstrap (root 1), whose APIs, image repository and build
# identity it relies on. State in Cloud Storage: bucket and prefix are given at `terraform init
# -backend-config=bucket=... -backend-config=prefix=...` (a partial configuration).
terraform {
  backend "gcs" {}
  required_version = ">= 1.9" # a variable's validation may name another variable
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
    archive = {
      source  = "hashicorp/archive"
      version = "~> 2.4"
    }
  }
}

# Credentials come from the environment (gcloud auth application-default login, or the CI's
# workload identity federation): never a key file.
provider "google" {
  project = var.project_id
  region  = var.region
}
