"""Envoy configuration: bootstrap, listeners, clusters and RBAC compiled from policy."""
