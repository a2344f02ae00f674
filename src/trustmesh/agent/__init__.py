"""trustmesh.agent."""
