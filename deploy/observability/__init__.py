"""Observability as code: the metric inventory, recording/alert rules and Grafana dashboards.

Regenerate everything derived from it with ``python -m deploy.observability.dashboards``.
"""
