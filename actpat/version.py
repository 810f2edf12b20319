"""The package version (one place; ``actpat.__version__`` and every artifact read it)."""

__version__ = "0.1.0"
