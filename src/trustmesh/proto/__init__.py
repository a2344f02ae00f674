"""trustmesh.proto."""
