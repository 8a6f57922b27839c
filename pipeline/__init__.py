"""fmap: feature-map aware compression and deployment pipeline for PyTorch vision models."""

__version__ = "0.1.0"
