variable "project_id" {
  description = "GCP project to deploy into"
  type        = string
}

variable "region" {
  description = "Region for the bucket, the function and the backend"
  type        = string
  default     = "europe-west1"
}

variable "env" {
  description = "Environment name, part of every resource name (dev, staging, prod)"
  type        = string
  default     = "prod"
}

variable "backend_image" {
  description = "Backend container image, e.g. europe-west1-docker.pkg.dev/PROJECT/ridestream/backend:TAG"
  type        = string
}

variable "run_id" {
  description = "MLflow RUN_ID the function serves at first deploy; afterwards `python -m operations.deploy redeploy` owns it"
  type        = string
}

variable "model_uri" {
  description = "Artifact folder of run_id's model (python -m training.registry resolve --field artifact_uri): a cold start reads only it; empty: the function searches the bucket"
  type        = string
  default     = ""
}

variable "model_version" {
  description = "Registry version of run_id, for the record in every result"
  type        = string
  default     = ""
}

variable "redis_url" {
  description = "An existing Redis (with persistence, maxmemory-policy noeviction) shared by the backend replicas; used only with memorystore_size_gb = 0"
  type        = string
  default     = ""
}

# The default keeps every ride: pending rides and finished results live in a shared, replicated store.
# 4 GB holds the default maximum rate (benchmarks/capacity.py: DEFAULT_MAX_RIDES_PER_SECOND) for as long as
# it lasts: each ride's record (about 1.7 KB) lives RESULT_TTL_SECONDS (4 h), 2.4 GB at 100 rides/s, below
# the memory alert (infra/capacity.tf). tests/test_capacity.py fails if it would not hold.
variable "memorystore_size_gb" {
  description = "Create a Memorystore Redis (STANDARD_HA, RDB snapshots, noeviction) of this size for the backend replicas; 0: none (then redis_url, or allow_in_memory_results)"
  type        = number
  default     = 4
  validation {
    condition     = var.memorystore_size_gb >= 0
    error_message = "memorystore_size_gb is a size in GB, or 0 for none."
  }
}

variable "allow_in_memory_results" {
  description = "Without a shared store, run one backend instance that keeps rides in its memory: every restart, deploy or scale event loses every pending and finished ride. For throwaway test projects only."
  type        = bool
  default     = false
}

variable "network" {
  description = "VPC network of the Memorystore instance and of the backend's Direct VPC egress"
  type        = string
  default     = "default"
}

variable "subnetwork" {
  description = "Subnetwork the backend's Direct VPC egress uses (in var.region)"
  type        = string
  default     = "default"
}

variable "backend_invokers" {
  description = "Who may call the backend: [\"allUsers\"] for a public rider API (default), or members such as [\"serviceAccount:app@PROJECT.iam.gserviceaccount.com\"]"
  type        = list(string)
  default     = ["allUsers"]
}

variable "backend_cors_allowed_origins" {
  description = "Origins whose web pages may call the rider API from a browser, e.g. [\"https://app.example.com\"]. Empty (default): only the backend's own rider page; native apps and servers need no CORS."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for origin in var.backend_cors_allowed_origins : can(regex("^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$", origin))])
    error_message = "Each entry must be an origin such as https://app.example.com (scheme and host, optional port, no path, no \"*\")."
  }
}

variable "deletion_protection" {
  description = "Refuse to destroy the backend service (set false to tear an environment down)"
  type        = bool
  default     = true
}

variable "mlflow_image" {
  description = "MLflow tracking server image (tracking_server/Dockerfile), e.g. europe-west1-docker.pkg.dev/PROJECT/ridestream/mlflow:3.17.2"
  type        = string
}

variable "mlflow_db_tier" {
  description = "Cloud SQL machine tier of the MLflow backend store"
  type        = string
  default     = "db-g1-small"
}

variable "mlflow_users" {
  description = "Who may use the MLflow server and its UI besides the training identity, e.g. [\"user:ops@example.com\"]"
  type        = list(string)
  default     = []
}

variable "rollout_image" {
  description = "Rollout service image (rollout/Dockerfile): follows the registry's production alias with the function"
  type        = string
}

variable "alert_notification_channels" {
  description = "Cloud Monitoring notification channels (ids) told when production is worse live than on its test month; none: the incident shows in the console only"
  type        = list(string)
  default     = []
}

variable "prediction_logs_in_default_bucket" {
  description = "Keep the function's prediction lines in the _Default log bucket (billed as Logging ingestion per GiB) as well as in the prediction-log bucket"
  type        = bool
  default     = false
}
