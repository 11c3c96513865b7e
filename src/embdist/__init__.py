"""embdist: geometry of language-model token embeddings, as an MLflow-tracked Hydra app.

Data flows one way: sources → geometry → pairwise (the distance engine) → tasks → tracking.
``embdist.pairwise.pairwise(x, metric)`` is the engine's entry point.
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    """``import embdist; embdist.pairwise(x, metric)`` works without importing the engine (and
    torch) first; the submodule is imported on first use."""
    if name == "pairwise":
        import importlib

        return importlib.import_module("embdist.pairwise")
    raise AttributeError(f"module 'embdist' has no attribute {name!r}")
