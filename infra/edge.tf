# --- the edge: an external Application Load Balancer with Cloud Armor in front of the backend ---------------
# Off by default (edge_rate_limit_per_minute = 0). The backend's own limits (backend/limits.py) protect its
# store and threads; a flood still reaches its instances. With the edge on, Cloud Armor refuses (429) what a
# client address sends over the rate before any instance sees it, and the backend takes traffic from the load
# balancer only. What it costs and how to point DNS at it: docs/api.md.

locals {
  edge = var.edge_rate_limit_per_minute > 0
}

resource "google_compute_security_policy" "edge" {
  #checkov:skip=CKV_GCP_73:the backend is Python (gunicorn, Flask): no Log4j to exploit; this policy's job is rate limiting
  count       = local.edge ? 1 : 0
  name        = "${local.prefix}-edge"
  description = "Rider API: a client address's requests beyond ${var.edge_rate_limit_per_minute} a minute are refused (429)"

  # Throttled, not banned: riders behind one carrier's NAT share an address, and a ban would refuse them all
  # for its length; a throttle refuses only what is over the rate.
  rule {
    action      = "throttle"
    priority    = 1000
    description = "per client address"
    match {
      versioned_expr = "SRC_IPS_V1"
      config {
        src_ip_ranges = ["*"]
      }
    }
    rate_limit_options {
      conform_action = "allow"
      exceed_action  = "deny(429)"
      enforce_on_key = "IP"
      rate_limit_threshold {
        count        = var.edge_rate_limit_per_minute
        interval_sec = 60
      }
    }
  }

  rule {
    action      = "allow"
    priority    = 2147483647
    description = "everything else"
    match {
      versioned_expr = "SRC_IPS_V1"
      config {
        src_ip_ranges = ["*"]
      }
    }
  }
}

# The backend's Cloud Run service as the load balancer's backend (a serverless network endpoint group).
resource "google_compute_region_network_endpoint_group" "backend" {
  count                 = local.edge ? 1 : 0
  name                  = "${local.prefix}-backend"
  region                = var.region
  network_endpoint_type = "SERVERLESS"
  cloud_run {
    service = google_cloud_run_v2_service.backend.name
  }
}

resource "google_compute_backend_service" "backend" {
  count                 = local.edge ? 1 : 0
  name                  = "${local.prefix}-backend"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  protocol              = "HTTPS"
  security_policy       = google_compute_security_policy.edge[0].id
  backend {
    group = google_compute_region_network_endpoint_group.backend[0].id
  }
  log_config {
    enable      = true
    sample_rate = 0.1 # a tenth of requests in the load balancer's log: enough to see a ban, not a bill
  }
}

resource "google_compute_url_map" "edge" {
  count           = local.edge ? 1 : 0
  name            = "${local.prefix}-edge"
  default_service = google_compute_backend_service.backend[0].id
}

resource "google_compute_managed_ssl_certificate" "edge" {
  count = local.edge ? 1 : 0
  name  = "${local.prefix}-edge"
  managed {
    domains = [var.edge_domain]
  }
  lifecycle {
    precondition {
      condition     = var.edge_domain != ""
      error_message = "The edge needs a domain for its certificate: set edge_domain (then point its DNS at the output edge_address)."
    }
  }
}

resource "google_compute_ssl_policy" "edge" {
  count           = local.edge ? 1 : 0
  name            = "${local.prefix}-edge"
  profile         = "MODERN"
  min_tls_version = "TLS_1_2"
}

resource "google_compute_target_https_proxy" "edge" {
  count            = local.edge ? 1 : 0
  name             = "${local.prefix}-edge"
  url_map          = google_compute_url_map.edge[0].id
  ssl_certificates = [google_compute_managed_ssl_certificate.edge[0].id]
  ssl_policy       = google_compute_ssl_policy.edge[0].id
}

resource "google_compute_global_address" "edge" {
  count = local.edge ? 1 : 0
  name  = "${local.prefix}-edge"
}

resource "google_compute_global_forwarding_rule" "edge" {
  count                 = local.edge ? 1 : 0
  name                  = "${local.prefix}-edge"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  target                = google_compute_target_https_proxy.edge[0].id
  ip_address            = google_compute_global_address.edge[0].id
  port_range            = "443"
}
