"""Evaluation metrics, one module per category."""
