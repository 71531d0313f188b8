"""Prefect flows and the ``attriflow`` command line."""
