"""Prefect tasks and the I/O they own (datasets, models, the run store)."""
