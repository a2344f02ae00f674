"""trustmesh.mesh."""
