"""Datasets: concept-shapes generator and ImageFolder loaders."""
