"""Workload attestors: what the kernel says about a process, as selectors."""
