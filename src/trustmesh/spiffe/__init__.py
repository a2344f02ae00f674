"""trustmesh.spiffe."""
