"""trustmesh: zero-trust workload identity (private CA, SPIFFE, mTLS mesh, policy)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
