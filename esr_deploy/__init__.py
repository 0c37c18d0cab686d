"""esr-deploy: a deployment compiler for efficient single-image super-resolution networks."""

__version__ = "0.1.0"
