"""The trustmesh command line: noun-verb groups, thin clients of the APIs."""
