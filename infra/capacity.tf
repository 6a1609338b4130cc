# --- capacity: told before the result store fills -------------------------------------------------
# The result store runs with maxmemory-policy noeviction (main.tf): full, it refuses every write and
# every POST /predict answers 503. Memorystore's usage_ratio (used memory / maxmemory) above the
# threshold for five minutes opens an incident, well before riders see it. The threshold is read by
# benchmarks/capacity.py, which reports the rate at which it fires with the default size and TTL.
# The instance is matched by the end of its instance_id label, which holds its name whether the label
# carries the full projects/.../instances/NAME or the name alone; each node (primary, replica) is a series.

resource "google_monitoring_alert_policy" "result_store_memory" {
  count                 = var.memorystore_size_gb > 0 ? 1 : 0
  display_name          = "ridestream ${var.env}: the result store is filling up"
  combiner              = "OR"
  notification_channels = var.alert_notification_channels
  conditions {
    display_name = "Memorystore memory usage above 80 % of maxmemory"
    condition_threshold {
      filter          = "metric.type=\"redis.googleapis.com/stats/memory/usage_ratio\" AND resource.type=\"redis_instance\" AND resource.label.instance_id=ends_with(\"${google_redis_instance.results[0].name}\")"
      comparison      = "COMPARISON_GT"
      threshold_value = 0.8
      duration        = "300s"
      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MEAN"
      }
    }
  }
  alert_strategy {
    auto_close = "86400s"
  }
  documentation {
    mime_type = "text/markdown"
    content   = "The backend's result store (Memorystore, noeviction) is above 80 % of its memory: when full, every new ride is refused (503). Each ride's record lives RESULT_TTL_SECONDS (4 h by default), so the memory held follows the rate of rides over the last hours. Raise `memorystore_size_gb` (a resize keeps the data) or shorten RESULT_TTL_SECONDS, no shorter than the longest ride plus the time riders take to report its outcome. docs/capacity.md gives the rate at which this fires."
  }
}
