"""Evaluation metrics, one module per category."""

#: Version of the metrics' numerics; part of every evaluation record's digest, so stores
#: evaluated by older code are re-evaluated (2: ties are never broken by raster order).
METRICS_VERSION = 2

#: Metrics whose per-sample value is a hit or a miss (pointing game: 1 or 0, a share for
#: tied maxima; increase in confidence: 100 or 0 percent): the report shows them as the
#: share of samples with its interval, not as a distribution.
BINARY_METRICS = frozenset({"pointing_game", "increase_soft", "increase_top"})
