variable "project_id" {
  description = "GCP project to deploy into"
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id is a Google Cloud project id: 6-30 lowercase letters, digits or hyphens, starting with a letter."
  }
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
  # With 8 characters at most, every name it enters keeps within Google's limit: service account ids 6-30
  # (ridestream-<env>-training), Cloud Run service and job names 49, Memorystore instance ids 40, secret
  # ids 255 (tests/test_infra.py works them out). Bucket names also hold the project id: checked at plan.
  validation {
    condition     = can(regex("^[a-z][a-z0-9]{0,7}$", var.env))
    error_message = "env must be 1-8 lowercase letters or digits, starting with a letter: it is part of service account ids (at most 30 characters) and bucket names (at most 63)."
  }
}

variable "backend_image" {
  description = "Backend container image, e.g. europe-west1-docker.pkg.dev/PROJECT/ridestream-prod/backend:TAG"
  type        = string
}

variable "function_image" {
  description = "The function's image (serving_function/ built with Google's buildpacks: operations/cloudbuild-function.yaml); only the first revision's: the rollout controller makes the others"
  type        = string
}

variable "build_service_account" {
  description = "What the function's source build runs as: infra/bootstrap's build_service_account output (an email)"
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]@[a-z0-9-]+\\.iam\\.gserviceaccount\\.com$", var.build_service_account))
    error_message = "build_service_account is a service account email, e.g. ridestream-prod-build@PROJECT.iam.gserviceaccount.com (infra/bootstrap's output)."
  }
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
  description = "An existing VPC network for the Memorystore instance and the backend's Direct VPC egress (with subnetwork); empty (default): the system makes its own"
  type        = string
  default     = ""
}

variable "subnetwork" {
  description = "With network: the subnetwork (in var.region) the backend's Direct VPC egress uses"
  type        = string
  default     = ""
  validation {
    condition     = (var.network == "") == (var.subnetwork == "")
    error_message = "Name both network and subnetwork, or neither (the system then makes its own)."
  }
}

variable "subnet_cidr" {
  description = "Address range of the subnet the system makes when no network is named (Direct VPC egress needs at least a /26)"
  type        = string
  default     = "10.8.0.0/24"
}

variable "backend_invokers" {
  description = "Who may call the backend: [\"allUsers\"] for a public rider API (default: the invoker check is off, no allUsers binding), or members such as [\"serviceAccount:app@PROJECT.iam.gserviceaccount.com\"]"
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
  description = "Cloud SQL machine tier of the MLflow backend store (Enterprise edition: shared-core db-f1-micro, db-g1-small, or db-custom-CPUS-MB)"
  type        = string
  default     = "db-g1-small"
  validation {
    condition     = can(regex("^(db-f1-micro|db-g1-small|db-custom-[0-9]+-[0-9]+)$", var.mlflow_db_tier))
    error_message = "The instance is Cloud SQL Enterprise edition: db-f1-micro, db-g1-small or db-custom-CPUS-MEMORY_MB (db-perf-optimized-* tiers are Enterprise Plus only)."
  }
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

variable "rollout_operators" {
  description = "E-mails whose Google ID tokens see the rollout service's /status and /readyz details (run ids, paths, errors); anyone else sees states and version numbers."
  type        = list(string)
  default     = []
}

variable "edge_rate_limit_per_minute" {
  description = "Requests a minute one client address may make; Cloud Armor refuses (429) the rest, at an external load balancer in front of the backend (infra/edge.tf, docs/api.md). 0 (default): no load balancer, the backend's own limits only."
  type        = number
  default     = 0
  validation {
    condition     = var.edge_rate_limit_per_minute >= 0
    error_message = "0 (off) or a number of requests a minute."
  }
}

variable "edge_domain" {
  description = "The rider API's domain at the edge (for its Google-managed certificate), e.g. api.example.com; needed when edge_rate_limit_per_minute > 0."
  type        = string
  default     = ""
}
