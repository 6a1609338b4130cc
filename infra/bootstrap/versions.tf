# Root 1 of 2, applied first: the project's APIs, the image repository and the build identity. The system
# (infra/) assumes all of it exists. State in Cloud Storage: bucket and prefix are given at
# `terraform init -backend-config=bucket=... -backend-config=prefix=...` (a partial configuration).
terraform {
  required_version = ">= 1.9" # a variable's validation may name another variable
  backend "gcs" {}
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
  }
}

# Credentials come from the environment (gcloud auth application-default login): never a key file.
provider "google" {
  project = var.project_id
  region  = var.region
}
