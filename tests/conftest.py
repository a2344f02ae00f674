"""Shared fixtures: real processes on loopback, always cleaned up."""
