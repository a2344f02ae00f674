"""trustmesh.server."""
