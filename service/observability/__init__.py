"""Observability: Prometheus metrics, their exposition, statistics, logs."""
