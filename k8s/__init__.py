"""Kubernetes manifests for multi-node runs and their generator."""
