"""trustmesh.pki.keys."""
