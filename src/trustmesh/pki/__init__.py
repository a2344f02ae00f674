"""trustmesh.pki."""
