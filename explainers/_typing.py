"""Shared type aliases for the explainer package."""

from __future__ import annotations

from typing import Union

JSONScalar = Union[str, int, float, bool, None]
JSONValue = Union[JSONScalar, list["JSONValue"], dict[str, "JSONValue"]]
