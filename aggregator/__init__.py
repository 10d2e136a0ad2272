"""footfall aggregator: receives agents' signed counts, stores them, serves merchants."""

__version__ = "0.1.0"
