# --- what an operator watches: the degradation alert, the flows' log-based metrics, one dashboard --------
# docs/flows-in-the-cloud.md says what each shows and which log lines feed it.

locals {
  live_quality_job = google_cloud_run_v2_job.flows["live_quality"].name
  # The hourly live-quality job (flows/live_quality_flow.py, run by flows/job.py) logs this line, through
  # Prefect's console handler on stderr (a plain line: Cloud Logging's textPayload), when production's live
  # RMSE over a window of enough completed rides is above its test RMSE by more than ALERT_RMSE_INCREASE.
  live_quality_degraded_filter = "resource.type=\"cloud_run_job\" AND resource.labels.job_name=\"${local.live_quality_job}\" AND textPayload:\"LIVE QUALITY DEGRADED\""
  # Its figures per version of the last complete window: one JSON line each on stdout (jsonPayload).
  live_quality_line_filter = "resource.type=\"cloud_run_job\" AND resource.labels.job_name=\"${local.live_quality_job}\" AND jsonPayload.message=\"live quality per version\""
  live_quality_labels = {
    model_version = "EXTRACT(jsonPayload.model_version)"
    answer        = "EXTRACT(jsonPayload.answer)" # final: what riders got; shadow: the candidate beside it
  }
  user_metric = "logging.googleapis.com/user"
  # The monitored resources the dashboard reads, as filter clauses.
  on_push_subscription = "resource.type=\"pubsub_subscription\" AND resource.label.subscription_id=\"${google_pubsub_subscription.function_push.name}\""
}

# How often production was found degraded: charted on the dashboard (the alert below needs no metric).
resource "google_logging_metric" "live_quality_degraded" {
  name   = "${local.prefix}-live-quality-degraded"
  filter = local.live_quality_degraded_filter
  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
  }
}

# The alert matches the log line itself (a log-match condition), so it needs no log-based metric: a
# threshold on a new log-based metric is refused with "Cannot find metric(s)" until the metric has
# propagated (up to minutes after its creation), which broke a one-shot apply.
resource "google_monitoring_alert_policy" "live_quality_degraded" {
  display_name          = "ridestream ${var.env}: production is worse live than on its test month"
  combiner              = "OR"
  notification_channels = var.alert_notification_channels
  conditions {
    display_name = "the live-quality job logged LIVE QUALITY DEGRADED"
    condition_matched_log {
      filter = local.live_quality_degraded_filter
    }
  }
  alert_strategy {
    # Required by a log-match condition: at most one notification an hour, as often as the job runs.
    notification_rate_limit {
      period = "3600s"
    }
    auto_close = "86400s"
  }
  documentation {
    mime_type = "text/markdown"
    content   = "Production's live RMSE on completed rides is above its test RMSE by more than the allowed share. The job's log line names the version and the figures; the dashboard `ridestream ${var.env}` charts live RMSE per version. docs/flows-in-the-cloud.md says what to do: roll back on Google Cloud (`make gcp-rollback`), or retrain."
  }
}

# Live RMSE and range coverage per version and answer, from the job's structured lines. Distributions: the
# dashboard charts their mean (exact, whatever the buckets), one point per hourly run.
resource "google_logging_metric" "live_rmse" {
  name             = "${local.prefix}-live-rmse"
  filter           = local.live_quality_line_filter
  value_extractor  = "EXTRACT(jsonPayload.rmse)"
  label_extractors = local.live_quality_labels
  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "DISTRIBUTION"
    unit        = "min"
    dynamic "labels" {
      for_each = local.live_quality_labels
      content {
        key        = labels.key
        value_type = "STRING"
      }
    }
  }
  bucket_options {
    linear_buckets {
      num_finite_buckets = 120
      width              = 0.25
      offset             = 0
    }
  }
}

resource "google_logging_metric" "live_interval_coverage" {
  name             = "${local.prefix}-live-interval-coverage"
  filter           = "${local.live_quality_line_filter} AND jsonPayload.interval_coverage:*" # answers with a range only
  value_extractor  = "EXTRACT(jsonPayload.interval_coverage)"
  label_extractors = local.live_quality_labels
  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "DISTRIBUTION"
    unit        = "1"
    dynamic "labels" {
      for_each = local.live_quality_labels
      content {
        key        = labels.key
        value_type = "STRING"
      }
    }
  }
  bucket_options {
    linear_buckets {
      num_finite_buckets = 100
      width              = 0.01
      offset             = 0
    }
  }
}

locals {
  # One chart: a title and its data sets (a filter, how to align and combine it, and a legend; per minute and
  # one line per chart unless a set says otherwise).
  dashboard_charts = [
    {
      title = "Rides/s (published to the push topic)"
      sets = [{
        filter  = "metric.type=\"pubsub.googleapis.com/topic/send_message_operation_count\" AND resource.type=\"pubsub_topic\" AND resource.label.topic_id=\"${google_pubsub_topic.push.name}\""
        aligner = "ALIGN_RATE", reducer = "REDUCE_SUM", legend = "rides/s"
      }]
    },
    {
      title = "Time to the final answer: the function's answer to each pushed ride (µs)"
      sets = [for p in [50, 95] : {
        filter  = "metric.type=\"pubsub.googleapis.com/subscription/push_request_latencies\" AND ${local.on_push_subscription}"
        aligner = "ALIGN_DELTA", reducer = "REDUCE_PERCENTILE_${p}", legend = "p${p}"
      }]
    },
    {
      title = "Oldest ride waiting for the function (s)"
      sets = [{
        filter  = "metric.type=\"pubsub.googleapis.com/subscription/oldest_unacked_message_age\" AND ${local.on_push_subscription}"
        aligner = "ALIGN_MAX", reducer = "REDUCE_MAX", legend = "oldest waiting"
      }]
    },
    {
      title = "Pending rides (undelivered on the function's push subscription)"
      sets = [{
        filter  = "metric.type=\"pubsub.googleapis.com/subscription/num_undelivered_messages\" AND ${local.on_push_subscription}"
        aligner = "ALIGN_MAX", reducer = "REDUCE_SUM", legend = "pending"
      }]
    },
    {
      title = "Dead letters"
      sets = [
        {
          filter  = "metric.type=\"pubsub.googleapis.com/subscription/dead_letter_message_count\" AND ${local.on_push_subscription}"
          aligner = "ALIGN_SUM", reducer = "REDUCE_SUM", legend = "dead-lettered by Pub/Sub (delivery attempts used up)"
        },
        {
          filter  = "metric.type=\"pubsub.googleapis.com/subscription/num_undelivered_messages\" AND resource.type=\"pubsub_subscription\" AND resource.label.subscription_id=\"${google_pubsub_subscription.deadletter_inspect.name}\""
          aligner = "ALIGN_MAX", reducer = "REDUCE_SUM", legend = "waiting for inspection (every dead letter)"
        },
      ]
    },
    {
      title = "Redis memory used (share of maxmemory; writes are refused when full)"
      sets = [{
        filter  = "metric.type=\"redis.googleapis.com/stats/memory/usage_ratio\" AND resource.type=\"redis_instance\" AND resource.label.instance_id=ends_with(\"/instances/${local.prefix}-results\")"
        aligner = "ALIGN_MAX", reducer = "REDUCE_MAX", legend = "memory usage ratio"
      }]
    },
    {
      title = "Live RMSE per version (min, last complete hour)"
      sets = [{
        filter  = "metric.type=\"${local.user_metric}/${google_logging_metric.live_rmse.name}\" AND resource.type=\"cloud_run_job\""
        aligner = "ALIGN_DELTA", reducer = "REDUCE_MEAN", group_by = ["metric.label.model_version", "metric.label.answer"], period = "3600s", legend = "$${metric.label.answer} v$${metric.label.model_version}"
      }]
    },
    {
      title = "Live range coverage per version (share of rides inside their range)"
      sets = [{
        filter  = "metric.type=\"${local.user_metric}/${google_logging_metric.live_interval_coverage.name}\" AND resource.type=\"cloud_run_job\""
        aligner = "ALIGN_DELTA", reducer = "REDUCE_MEAN", group_by = ["metric.label.model_version", "metric.label.answer"], period = "3600s", legend = "$${metric.label.answer} v$${metric.label.model_version}"
      }]
    },
    {
      title = "Live quality degraded (the alert's line)"
      sets = [{
        filter  = "metric.type=\"${local.user_metric}/${google_logging_metric.live_quality_degraded.name}\" AND resource.type=\"cloud_run_job\""
        aligner = "ALIGN_SUM", reducer = "REDUCE_SUM", group_by = [], period = "3600s", legend = "degraded runs"
      }]
    },
  ]
}

resource "google_monitoring_dashboard" "operations" {
  dashboard_json = jsonencode({
    displayName = "ridestream ${var.env}"
    mosaicLayout = {
      columns = 12
      tiles = [for index, chart in local.dashboard_charts : {
        xPos   = (index % 2) * 6
        yPos   = floor(index / 2) * 4
        width  = 6
        height = 4
        widget = {
          title = chart.title
          xyChart = {
            dataSets = [for set in chart.sets : {
              plotType           = "LINE"
              legendTemplate     = set.legend
              minAlignmentPeriod = lookup(set, "period", "60s")
              timeSeriesQuery = {
                timeSeriesFilter = {
                  filter = set.filter
                  aggregation = {
                    alignmentPeriod    = lookup(set, "period", "60s")
                    perSeriesAligner   = set.aligner
                    crossSeriesReducer = set.reducer
                    groupByFields      = lookup(set, "group_by", [])
                  }
                }
              }
            }]
          }
        }
      }]
    }
  })
}
