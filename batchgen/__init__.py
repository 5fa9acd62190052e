"""batchgen: turn one YAML manifest into thousands of generated images, resumably."""

__version__ = "0.1.0"

__all__ = ["__version__"]
