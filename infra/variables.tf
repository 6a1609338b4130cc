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
variable "memorystore_size_gb" {
  description = "Create a Memorystore Redis (STANDARD_HA, RDB snapshots, noeviction) of this size for the backend replicas; 0: none (then redis_url, or allow_in_memory_results)"
  type        = number
  default     = 1
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

# --- the flows as Cloud Run jobs (infra/flows.tf) -------------------------------------------------

variable "flows_image" {
  description = "The flows' image (flows/Dockerfile): the training, monitoring and live-quality Cloud Run jobs run it"
  type        = string
}

variable "trip_data" {
  description = "gs:// prefix holding the TLC trip months (<color>_tripdata_<YYYY-MM>.parquet) training and the drift reference read; empty: gs://<models bucket>/trip-data"
  type        = string
  default     = ""
  validation {
    condition     = var.trip_data == "" || startswith(var.trip_data, "gs://")
    error_message = "trip_data is a gs:// prefix (training lists it to find the newest three months), or empty."
  }
}

variable "training_trials" {
  description = "Hyper-parameter trials of each scheduled training"
  type        = number
  default     = 3
}

variable "flows_time_zone" {
  description = "Time zone of the flows' schedules (tz database name), the taxis' own by default"
  type        = string
  default     = "America/New_York"
}

variable "flows_schedules" {
  description = "When each flow's job runs (cron, in flows_time_zone): training weekly (Monday 06:00), the drift report daily, live quality hourly at 5 past, once the hour's outcomes have landed. Give all three to change one."
  type        = map(string)
  default = {
    training     = "0 6 * * 1"
    monitoring   = "0 7 * * *"
    live_quality = "5 * * * *"
  }
  validation {
    condition     = toset(keys(var.flows_schedules)) == toset(["training", "monitoring", "live_quality"])
    error_message = "flows_schedules names exactly the three jobs: training, monitoring, live_quality."
  }
  validation {
    condition     = alltrue([for schedule in values(var.flows_schedules) : length(split(" ", trimspace(schedule))) == 5])
    error_message = "A cron schedule has five fields: minute hour day-of-month month day-of-week."
  }
}
