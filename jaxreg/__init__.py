"""jaxreg: normalization and regularization ablation studies in JAX/Flax.

Data flow, one module per stage:
config -> data -> models (norms) -> optim (schedules) -> augment -> train
-> metrics -> results -> sweep -> report.
"""
__version__ = "0.1.0"
