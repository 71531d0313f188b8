"""Evaluation metrics, one module per category."""

#: Version of the metrics' numerics; part of every evaluation record's digest, so stores
#: evaluated by older code are re-evaluated (2: ties are never broken by raster order).
METRICS_VERSION = 2
