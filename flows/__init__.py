"""Prefect 3 flows: training with gated promotion, batch scoring, monitoring."""
