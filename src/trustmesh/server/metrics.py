"""Prometheus metrics of the trust authority (one registry per server instance)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ServerMetrics"]


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.issued = Counter(
            "trustmesh_certificates_issued_total",
            "Certificates issued, by template.",
            ["template"],
            registry=self.registry,
        )
        self.issue_errors = Counter(
            "trustmesh_certificate_issue_errors_total",
            "Refused or failed issuance requests, by error code.",
            ["code"],
            registry=self.registry,
        )
        self.revoked = Counter(
            "trustmesh_certificates_revoked_total",
            "Certificates revoked, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.ocsp_responses = Counter(
            "trustmesh_ocsp_responses_total",
            "OCSP responses sent, by outcome (good, revoked, unknown, malformedRequest, ...).",
            ["outcome"],
            registry=self.registry,
        )
        self.crl_number = Gauge(
            "trustmesh_crl_number",
            "Number of the latest CRL signed, by CA.",
            ["ca_id"],
            registry=self.registry,
        )
        self.ca_expiry = Gauge(
            "trustmesh_ca_not_after_seconds",
            "Expiry time (unix seconds) of each CA certificate in the chain.",
            ["ca_id", "role"],
            registry=self.registry,
        )
        self.ca_slots = Gauge(
            "trustmesh_x509_ca_slot",
            "X.509 signing CAs published in the bundle: 1 for the CA's current state "
            "(prepared, active, old).",
            ["ca_id", "state"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "trustmesh_http_request_duration_seconds",
            "Latency of HTTP requests, by route.",
            ["route"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )

    def track_xds(self, stats: Any, revision: Callable[[], int]) -> None:
        """Export the ADS server's counters (read when scraped)."""
        for name, doc, attr in (
                ("trustmesh_xds_streams", "Open ADS streams (connected sidecars and gateways).",
                 "connected"),
                ("trustmesh_xds_pushes", "ADS responses sent since start.", "pushes"),
                ("trustmesh_xds_acks", "ADS responses sidecars accepted since start.", "acks"),
                ("trustmesh_xds_nacks", "ADS responses sidecars rejected since start.",
                 "nacks")):
            def read(attr: str = attr) -> float:
                return float(getattr(stats, attr))

            Gauge(name, doc, registry=self.registry).set_function(read)
        Gauge("trustmesh_mesh_revision", "Revision of the mesh configuration being served.",
              registry=self.registry).set_function(lambda: float(revision()))

    def update_ca_slots(self, slots: list[tuple[str, str]]) -> None:
        """Show exactly the given (ca_id, state) pairs; retired CAs disappear."""
        self.ca_slots.clear()
        for ca_id, state in slots:
            self.ca_slots.labels(ca_id, state).set(1)
