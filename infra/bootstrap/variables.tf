variable "project_id" {
  description = "GCP project to deploy into"
  type        = string
}

variable "region" {
  description = "Region of the image repository (and of the system)"
  type        = string
  default     = "europe-west1"
}

variable "env" {
  description = "Environment name, part of every resource name (dev, staging, prod)"
  type        = string
  default     = "prod"
  # The longest name built from it is a service account id, ridestream-<env>-training (6-30 characters).
  validation {
    condition     = can(regex("^[a-z][a-z0-9]{0,7}$", var.env))
    error_message = "env must be 1-8 lowercase letters or digits, starting with a letter: it is part of service account ids (at most 30 characters) and bucket names (at most 63)."
  }
}
