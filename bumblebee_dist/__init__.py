"""bumblebee-dist: a foundation model for dileptonic top-pair events."""

__version__ = "0.1.0"
