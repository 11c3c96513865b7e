"""embdist: geometry of language-model token embeddings, as an MLflow-tracked Hydra app.

Data flows one way: sources → geometry → pairwise (the distance engine) → tasks → tracking.
``embdist.pairwise.pairwise(x, metric)`` is the engine's entry point.
"""
__version__ = "0.1.0"
