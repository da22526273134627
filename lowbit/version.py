"""The package version (one place; ``lowbit.__version__`` and checkpoint metadata read it)."""

__version__ = "0.1.0"
