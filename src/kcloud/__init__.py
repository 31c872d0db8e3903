"""K-Cloud: automatic parallelization of AI models across heterogeneous accelerators."""

__version__ = "0.1.0"
